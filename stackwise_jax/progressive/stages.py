"""Stage-structure policy: which stacks each stage adds and trains, how the trunk is frozen or
quantized before it, and how a run's structure is replayed from a checkpoint or an export.

These are the trainer's rules as plain functions, so benchmarks, tests, evaluation, sampling and
export grow a rack exactly as a run does (`rack_from_checkpoint`) without a trainer or a mesh.
"""
import dataclasses
import json

import jax

from stackwise_jax.checkpoint import open_run, restore_into
from stackwise_jax.config import from_yaml, stage_sizes
from stackwise_jax.errors import ConfigError
from stackwise_jax.progressive.builder import ProgressiveRackBuilder
from stackwise_jax.progressive.masking import check_time_steps_kept


def stage_specs(builder, target: int):
  """Yields the specs each stage adds: untrained stacks first, then the new stacks of each stage
  as `training.progressive.stacks_per_stage` says (`config.stage_sizes`; with progressive
  training off, all remaining stacks in one stage); then, with `training.final_stage`, an empty
  list: the final stage, which adds nothing and trains the whole rack (`is_final`)."""
  untrained = [s for s in builder.specs if s.name not in builder.trained]
  if untrained:
    yield untrained
  if not builder.config.training.progressive.enabled and len(builder.specs) < target:
    yield builder.add_stacks(target - len(builder.specs))
  for size in stage_sizes(builder.config, len(builder.specs), target):
    yield builder.add_stacks(size)
  if builder.config.training.final_stage and builder.specs:
    yield []


def is_final(new_specs) -> bool:
  """Whether a stage that adds `new_specs` (from `stage_specs`) is the final stage."""
  return not new_specs


def set_labels(builder, final: bool = False) -> set[str]:
  """Design §4: trunk frozen, adapters only or trained (by `trunk_strategy`); embedding/head by
  `embedding_training`. Returns the names of the frozen stacks.

  "auto": once a trunk exists, the input side (token/time embedding) is frozen, since it feeds
  the frozen trunk (training it would change the trunk's input and stale the cache); the head
  side (final norm, untied head) trains in append mode and is frozen in prepend mode. Under
  `trunk_strategy="train"` the trunk trains too (`train_trunk`), nothing is cached, and "auto"
  trains both sides, as the final stage does.

  The `final` stage trains every stack as far as its precision allows (`unfreeze_all`) and both
  sides of the embedding/head, unless `embedding_training="frozen"`.
  """
  p = builder.config.training.progressive
  if final:
    builder.unfreeze_all()
    both = p.embedding_training != "frozen"
    builder.set_embedding_trainable(input_side=both, head_side=both)
    return {s.name for s in builder.specs if builder.is_frozen(s.name)}
  has_trunk = bool(builder.trained)
  if has_trunk:
    {"frozen": builder.freeze_trunk, "qlora": builder.freeze_all_but_qlora,
     "train": builder.train_trunk}[p.trunk_strategy]()
  mode = p.embedding_training
  if not has_trunk or mode == "trainable" or (mode == "auto" and p.trunk_strategy == "train"):
    builder.set_embedding_trainable(input_side=True, head_side=True)
  elif mode == "frozen":
    builder.set_embedding_trainable(input_side=False, head_side=False)
  else:
    builder.set_embedding_trainable(input_side=False, head_side=builder.building_mode == "append")
  return {s.name for s in builder.specs if builder.is_frozen(s.name)}


def grow(builder, target: int, n_stages: int | None = None, last_done: bool = True,
         stages=None):
  """Runs the builder operations of a run's stages on `builder`: adds the stacks, freezes or
  quantizes the trunk, sets labels; the first `n_stages` stages (default: all up to `target`
  stacks). The last stage's stacks count as trained only if `last_done`. `stages`: a
  `stage_specs` generator to draw from (the trainer's, to go on from there). Returns (specs of
  the last stage, names of the stacks frozen in it, its 1-based number)."""
  stages = iter(stage_specs(builder, target) if stages is None else stages)
  new, frozen, stage = None, set(), 0
  while True:
    # As in a run, a stage's stacks are trained before the next stage adds its own (which a
    # copying new_stack_init copies).
    done = {s.name for s in new or ()} - builder.trained
    builder.trained.update(done)
    upcoming = next(stages, None)
    if upcoming is None:
      builder.trained.difference_update(done)   # the last stage's: trained only if last_done
      break
    new, stage = upcoming, stage + 1
    frozen = set_labels(builder, is_final(new))
    if stage == n_stages:
      break
  if new is not None and last_done:
    builder.trained.update(s.name for s in new)
  return new, frozen, stage


def next_stage_shapes(config, target: int, number: int, specs_now: list[dict]):
  """The builder of stage `number` + 1 as stage `number` (whose rack has `specs_now`, as
  `stack_specs`) leaves it, grown by `grow` on a fresh builder of `config` under `jax.eval_shape`:
  its specs, labels and graphdefs, its params as `jax.ShapeDtypeStruct`s (no init runs). Returns
  (that builder, the stage's new specs, its frozen stack names), or None where there is no next
  stage or the run's rack is not the one `config` grows (a builder grown by hand)."""
  found = {}

  def grown():
    builder = ProgressiveRackBuilder(config)
    stages = stage_specs(builder, target)
    grow(builder, target, number, stages=stages)
    if stack_specs(builder.specs) == specs_now:
      new, frozen, reached = grow(builder, target, 1, last_done=False, stages=stages)
      if reached:
        found.update(builder=builder, new=new, frozen=frozen)
    return builder.params

  params = jax.eval_shape(grown)
  if not found:
    return None
  found["builder"].params = params   # shapes in place of the tracers the trace left
  return found["builder"], found["new"], found["frozen"]


def replay(builder, specs: list[dict], n_stages: int, last_done: bool = True, source: str = "",
           stages=None):
  """`grow` a run's first `n_stages` stages on `builder` (same config, empty), then checks the
  stack specs against `specs` (as JSON) from `source` (a checkpoint or an export). Returns the
  specs of the last stage."""
  new, _, _ = grow(builder, len(specs), n_stages, last_done, stages)
  built = stack_specs(builder.specs)
  if built != specs:
    raise ConfigError(f"{source}: its rack structure {specs} is not the one this config "
                      f"builds ({built}); use the run's config, pass --fresh, or choose "
                      "another --workdir")
  return new


def stack_specs(specs) -> list[dict]:
  """Stack specs as they read back from JSON (tuples become lists)."""
  return json.loads(json.dumps([dataclasses.asdict(s) for s in specs]))


def load_rack(workdir: str, step: int | None = None):
  """The rack of checkpoint `step` (default: the latest readable one) in `workdir`, for eval,
  sampling or export. Its config and structure come from the checkpoint alone."""
  checkpoints = open_run(workdir)
  ckpt = checkpoints.latest if step is None else checkpoints.read(step)
  checkpoints.close()
  return rack_from_checkpoint(checkpoints.config, ckpt)


def rack_from_checkpoint(config, ckpt):
  """The rack a checkpoint (`RunCheckpoints.read`) of a run with `config` holds."""
  builder = ProgressiveRackBuilder(config)
  restore_checkpoint(builder, ckpt)
  return builder.build_rack()


def restore_checkpoint(builder, ckpt, stages=None):
  """Replays `ckpt`'s stages on `builder` (its run's config, empty; `stages`: a `stage_specs`
  generator to go on from) and loads its params: the one way a rack comes back from a
  checkpoint. Returns the specs of its last stage."""
  meta = ckpt.meta
  # Trained stacks whose time steps this config would move: one line naming the fields, before
  # replay's whole-structure mismatch.
  check_time_steps_kept(meta["specs"], from_yaml(meta["config"]), builder.config, ckpt.path)
  new = replay(builder, meta["specs"], meta["stage"], ckpt.stage_done, ckpt.path, stages)
  builder.update_params(restore_into(builder.params, ckpt.params, "params"))
  return new

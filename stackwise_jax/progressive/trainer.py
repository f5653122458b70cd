"""ProgressiveTrainer (design §3): one stage per new stack, one jitted train step per stage."""
import contextlib
import dataclasses
import functools
import json
import math
import signal
import sys
import threading
import time

import jax
import numpy as np
from tqdm.auto import tqdm

from stackwise_jax.checkpoint import RunCheckpoints, open_run, restore_into
from stackwise_jax.config import ConfigError, validate
from stackwise_jax.model.lora import is_adapter_path, leaf_bytes, plain_keys
from stackwise_jax.progressive.builder import TRAINABLE, ProgressiveRackBuilder
from stackwise_jax.progressive.caching import ActivationCache
from stackwise_jax.progressive.guard import DivergenceGuard
from stackwise_jax.progressive.masking import check_objective_data
from stackwise_jax.sharding import (global_batch, local_batch, make_mesh, replicated,
                                    tree_shardings)
from stackwise_jax.progressive.steps import (init_train_state, make_eval_step, make_optimizer,
                                             make_train_step, plan_stage, prefix_activations)

EVAL_SALT = 1 << 20   # time-step draws for evaluation are the same at every stage


class ProgressiveTrainer:
  """Trains a rack stage by stage. `results` holds one dict per stage (see `_run_stage`)."""

  def __init__(self, config, *, progress: bool = True, log=None,
               checkpoints: RunCheckpoints | None = None, devices=None, metrics=None):
    """`checkpoints`: where the run saves (`training.checkpoint_every` steps, the end of every
    stage, SIGINT/SIGTERM) and, if they hold a checkpoint, where it resumes from (design §9).
    `devices`: those the mesh spans (default: all; design §11, sharding.py). `metrics`: where
    losses go as they come (`metrics.TensorBoard`). After each stage, `state` holds its final
    train state (params, optimizer state) as placed on the mesh."""
    self.config = validate(config)
    self.progress = progress
    self.log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    self.checkpoints, self.metrics = checkpoints, metrics
    self.mesh = make_mesh(self.config, devices)
    self.state = None
    self.results = {"stages": [], "final_eval_loss": None}
    self._told_streaming = False
    self._stop_signal = None   # set by SIGINT/SIGTERM: save, then stop

  def train_progressively(self, rack_builder: ProgressiveRackBuilder, dataloader,
                          target_stacks: int | None = None) -> dict:
    """Grows `rack_builder` to `target_stacks`, training each new stack in its own stage.

    Stacks already in the builder that were never trained are trained together in the first
    stage. `dataloader` has `train_iter()` (yielding {"tokens": [B, T], "example_id": [B]}) and
    `eval_batches(n)`.
    """
    p = self.config.training.progressive
    target = p.target_stacks if target_stacks is None else target_stacks
    if not len(rack_builder.specs) <= target <= p.max_stacks:
      raise ValueError(f"target_stacks={target}: must be between the rack's current "
                       f"{len(rack_builder.specs)} stacks and training.progressive.max_stacks="
                       f"{p.max_stacks}")
    eval_batches = dataloader.eval_batches(self.config.training.eval_batches)
    check_objective_data(p.training_objective, eval_batches[0])
    data = dataloader.train_iter()
    with _saving_on_signals(self, enabled=self.checkpoints is not None):
      for new, resume in self._stage_plan(rack_builder, target, data):
        stage = len(self.results["stages"]) + 1
        self._run_stage(rack_builder, new, stage, target, data, eval_batches, resume)
    return self.results

  train_rack = train_progressively   # the upstream's name for the same entry

  def _stages(self, builder, target):
    """Yields the specs each stage trains: untrained stacks first, then one new stack a stage
    (or, with progressive training off, all remaining stacks in one stage)."""
    untrained = [s for s in builder.specs if s.name not in builder.trained]
    if untrained:
      yield untrained
    if not self.config.training.progressive.enabled and len(builder.specs) < target:
      yield [builder.add_stack() for _ in range(target - len(builder.specs))]
    while len(builder.specs) < target:
      yield [builder.add_stack()]

  def _stage_plan(self, builder, target, data):
    """Yields (specs a stage trains, where it resumes or None). With a checkpoint, first rebuilds
    the rack's structure by replaying the stages it finished and restores params, results and
    the data iterator; a stage cut off mid-way comes first, with its optimizer state."""
    stages = self._stages(builder, target)
    if self.checkpoints is not None and self.checkpoints.latest is not None:
      new, resume = self.restore(builder, stages, data)
      if resume is not None:
        yield new, resume
    for new in stages:
      yield new, None

  def restore(self, builder, stages=None, data=None):
    """Replays the stages of the latest checkpoint on `builder` (same config, empty) and loads
    their params; `data`, if given, is set to the checkpoint's iterator state. Returns
    (specs of the last stage, the checkpoint if that stage was cut off mid-way, else None)."""
    ckpt = self.checkpoints.latest
    meta = ckpt.meta
    new = self.load_checkpoint(builder, ckpt, stages)
    self.results = meta["results"]
    if data is not None:
      self.checkpoints.restore_data(data)
    where = ("the end of the stage" if ckpt.stage_done
             else f"step {meta['step']}/{meta['steps_per_stack']}")
    self.log(f"resuming from {ckpt.path}: stage {meta['stage']}, {where}")
    return new, None if ckpt.stage_done else ckpt

  def load_checkpoint(self, builder, ckpt, stages=None):
    """Replays `ckpt`'s stages on `builder` (same config, empty) and loads its params. Returns
    the specs of its last stage."""
    meta = ckpt.meta
    new = self.replay(builder, meta["specs"], meta["stage"], ckpt.stage_done, ckpt.path, stages)
    builder.update_params(restore_into(builder.params, ckpt.params, "params"))
    return new

  def replay(self, builder, specs, n_stages, last_done=True, source="", stages=None):
    """Rebuilds a rack's structure on `builder` (same config, empty): re-runs the builder
    operations of its first `n_stages` stages (add stacks, freeze or quantize the trunk) on fresh
    params, and checks the stack specs against `specs` (as JSON) from `source`. Returns the specs
    of the last stage."""
    stages = self._stages(builder, len(specs)) if stages is None else stages
    for stage in range(1, n_stages + 1):
      new = next(stages)
      self._set_labels(builder)
      if stage < n_stages or last_done:
        builder.trained.update(s.name for s in new)
    built = stack_specs(builder.specs)
    if built != specs:
      raise ConfigError(f"{source}: its rack structure {specs} is not the one this config "
                        f"builds ({built}); use the run's config, pass --fresh, or choose "
                        "another --workdir")
    return new

  def _save(self, builder, stage, step, state, data_state, progress) -> None:
    """Checkpoints the run at `step` of `stage` (`progress`: the stage's losses so far)."""
    steps = self.config.training.steps_per_stack
    opt = {k: v for k, v in state.items() if k != "params"}
    meta = {"stage": stage, "step": step, "building_mode": builder.building_mode,
            "specs": stack_specs(builder.specs),
            "results": self.results, "progress": progress}
    self.checkpoints.save((stage - 1) * steps + step, params=state["params"], opt=opt,
                          data_state=data_state, meta=meta)

  def _set_labels(self, builder) -> set[str]:
    """Design §4: trunk frozen (or adapters only); embedding/head by `embedding_training`.

    "auto": once a trunk exists, the input side (token/time embedding) is frozen, since it feeds
    the frozen trunk (training it would change the trunk's input and stale the cache); the head
    side (final norm, untied head) trains in append mode and is frozen in prepend mode.
    """
    p = self.config.training.progressive
    has_trunk = bool(builder.trained)
    if has_trunk:
      freeze = builder.freeze_trunk if p.trunk_strategy == "frozen" else builder.freeze_all_but_qlora
      freeze()
    mode = p.embedding_training
    if not has_trunk or mode == "trainable":
      builder.set_embedding_trainable(input_side=True, head_side=True)
    elif mode == "frozen":
      builder.set_embedding_trainable(input_side=False, head_side=False)
    else:
      builder.set_embedding_trainable(input_side=False, head_side=builder.building_mode == "append")
    return {s.name for s in builder.specs if builder.is_frozen(s.name)}

  def _run_stage(self, builder, new_specs, stage, target, data, eval_batches, resume) -> None:
    """Trains one stage (from `resume`, a mid-stage checkpoint, if given), appends its result to
    `self.results` and checkpoints its end."""
    t, p = self.config.training, self.config.training.progressive
    started = time.perf_counter()
    first_step = (stage - 1) * t.steps_per_stack   # the run's step count before this stage
    frozen = self._set_labels(builder)
    builder.update_params(jax.device_put(builder.params, tree_shardings(self.mesh, builder.params)))
    rack, labels = builder.build_rack(), builder.labels()
    new = tuple(s.name for s in new_specs)
    plan = plan_stage(rack, stage, new, frozen, p.cache_activations)
    if p.cache_activations and not plan.cached and builder.trained and not self._told_streaming:
      self._told_streaming = True
      why = ("prepend mode: the trunk follows the new stack" if builder.building_mode == "prepend"
             else "the trunk's adapters train, so cached trunk outputs would go stale")
      self.log(f"cache_activations=True, but trunk activations are streamed ({why})")
    k = new_specs[-1].index
    masking = builder.masking
    prepare = jax.jit(functools.partial(masking.generate_masks_for_stack, k=k, salt=stage))

    cache = None
    stage_start = data.get_state()   # where a cached stage's data resumes from
    if plan.cached:
      cache = self._build_cache(rack, plan, prepare, data, stage)
      example_at = lambda i: global_batch(self.mesh, {**cache.get(i)[1], "h": cache.get(i)[0]})
    else:
      example_at = lambda i: prepare(global_batch(self.mesh, next(data)))

    tx = make_optimizer(t, labels, t.steps_per_stack)
    state = init_train_state(rack.params, tx, plan)
    losses, eval_curve, eval_seconds, start, skipped = [], [], 0.0, 0, 0
    if resume is not None:
      opt = restore_into({k: v for k, v in state.items() if k != "params"}, resume.opt,
                         "optimizer state")
      state = {**state, **opt}
      start = resume.meta["step"]
      losses = [math.nan if x is None else x for x in resume.meta["progress"]["losses"]]
      eval_curve = resume.meta["progress"]["eval_curve"]
      skipped = resume.meta["progress"]["skipped_steps"]
    shardings = tree_shardings(self.mesh, state)
    state = jax.device_put(state, shardings)
    train_step = make_train_step(rack, plan, tx, labels, dropout_seed=t.seed * 1000 + stage,
                                 shardings=(shardings, replicated(self.mesh)))
    eval_step = make_eval_step(rack)
    eval_examples = [self.eval_example(masking, global_batch(self.mesh, b))
                     for b in eval_batches]

    cache_bytes = (cache.nbytes, cache.bytes_on_disk) if cache else (0, 0)   # before it is closed
    guard = DivergenceGuard(t.nonfinite, t.max_skipped_steps, stage, losses, skipped)
    bar = tqdm(total=t.steps_per_stack, initial=start, disable=not self.progress,
               desc=f"stage {stage}/{target} [{plan.activation_mode}]", dynamic_ncols=True,
               file=sys.stderr)
    try:
      for i in range(start, t.steps_per_stack):
        state, metrics = train_step(state, example_at(i))
        loss = metrics["loss"]
        losses.append(loss)
        guard.after(i + 1, metrics)
        if i == start:
          loss.block_until_ready()
          steady_start = time.perf_counter()   # excludes compilation from tokens/s
        last = i + 1 == t.steps_per_stack
        if last or (t.eval_every and (i + 1) % t.eval_every == 0):
          guard.flush()   # steps are dispatched asynchronously: they are not eval time
          eval_started = time.perf_counter()
          eval_curve.append([i + 1, self._evaluate(eval_step, state["params"], eval_examples)])
          eval_seconds += time.perf_counter() - eval_started
          bar.set_postfix(loss=f"{float(loss):.3f}", eval=f"{eval_curve[-1][1]:.3f}")
          self._metric("eval/loss", eval_curve[-1][1], first_step + i + 1)
        elif (i + 1) % t.log_every == 0:
          bar.set_postfix(loss=f"{float(loss):.3f}")
        if (i + 1) % t.log_every == 0:
          self._metric("train/loss", float(loss), first_step + i + 1)
        bar.update(1)
        due = t.checkpoint_every and (i + 1) % t.checkpoint_every == 0
        if self.checkpoints is not None and not last and (due or self._stop_signal):
          guard.flush()   # a diverged state is never saved
          progress = {"losses": [float(x) for x in losses], "eval_curve": eval_curve,
                      "skipped_steps": guard.skipped}
          self._save(builder, stage, i + 1, state,
                     stage_start if plan.cached else data.get_state(), progress)
          self._stop_if_asked(stage, i + 1)
      guard.flush()
    finally:
      bar.close()
      if cache:
        cache.close()
    jax.block_until_ready(state["params"])
    steady_seconds = time.perf_counter() - steady_start - eval_seconds
    builder.update_params(state["params"])
    self.state = state
    builder.trained.update(new)

    losses = [float(x) for x in losses]
    steady_steps = max(t.steps_per_stack - start - 1, 1)
    tokens_per_step = t.batch_size * t.seq_len
    counts = _param_counts(state["params"], labels)
    memory = stack_memory(rack.specs, state["params"], state["opt_state"])
    result = {
        "stage": stage,
        "stack_index": k,
        "new_stacks": list(new),
        "stack_order": list(rack.order),
        "building_mode": builder.building_mode,
        "time_step": new_specs[-1].time_step,
        "mask_ratio": masking.mask_ratio_for_stack(k),
        "steps": t.steps_per_stack,
        "tokens": t.steps_per_stack * tokens_per_step,
        "loss_start": losses[0],
        "loss_end": _finite_mean(losses[-min(10, len(losses)):]),
        "eval_loss": eval_curve[-1][1] if eval_curve else None,
        "tokens_per_s": steady_steps * tokens_per_step / max(steady_seconds, 1e-9),
        "step_seconds": steady_seconds / steady_steps,
        "seconds": time.perf_counter() - started,
        "trainable_params": counts["trainable"],
        "frozen_params": counts["frozen"],
        "lora_params": counts["lora"],
        "memory": memory,
        "cache_bytes": cache_bytes[0],
        "cache_bytes_on_disk": cache_bytes[1],
        "activation_mode": plan.activation_mode,
        "skipped_steps": guard.skipped,
        "peak_memory_bytes": _peak_device_memory(),
        "losses": losses,
        "eval_curve": eval_curve,
    }
    self.results["stages"].append(result)
    if self.metrics is not None:
      self.metrics.stage(result)
    self.results["final_eval_loss"] = result["eval_loss"]
    if self.checkpoints is not None:
      self._save(builder, stage, t.steps_per_stack, state, data.get_state(), progress=None)
      self._stop_if_asked(stage, t.steps_per_stack)

  def _metric(self, tag, value, step) -> None:
    if self.metrics is not None:
      self.metrics.scalar(tag, value, step)

  def _stop_if_asked(self, stage, step) -> None:
    if self._stop_signal is not None:
      raise TrainingInterrupted(f"stopped by {signal.Signals(self._stop_signal).name} at stage "
                                f"{stage}, step {step}: checkpoint saved in "
                                f"{self.checkpoints.directory}; run the same command to resume",
                                self._stop_signal)

  def _build_cache(self, rack, plan, prepare, data, stage) -> ActivationCache:
    """Runs the frozen prefix once over the stage's examples (design §8)."""
    t = self.config.training
    prefix = jax.jit(functools.partial(prefix_activations, rack, plan.prefix))
    shape = (t.batch_size // jax.process_count(), t.seq_len, self.config.model.d_model)
    spill_dir = f"{t.workdir}/cache" if t.workdir else None
    cache = ActivationCache(t.steps_per_stack, shape, t.progressive.cache_max_bytes, spill_dir)
    for i in tqdm(range(t.steps_per_stack), desc=f"stage {stage}: caching trunk activations",
                  disable=not self.progress, dynamic_ncols=True, file=sys.stderr, leave=False):
      example = prepare(global_batch(self.mesh, next(data)))
      h = prefix(rack.params, example)
      cache.put(i, *jax.device_get(local_batch(self.mesh, (h, example))))   # this host's share
    if cache.bytes_on_disk:
      self.log(f"stage {stage}: activation cache {cache.nbytes / 2**20:.1f} MiB, "
               f"{cache.bytes_on_disk / 2**20:.1f} MiB spilled to disk")
    return cache

  @staticmethod
  def eval_example(masking, batch):
    """Evaluation masks draw their time steps per example, identically at every stage."""
    return masking.example(batch, masking.sample_time_steps(batch["example_id"], EVAL_SALT))

  @staticmethod
  def _evaluate(eval_step, params, eval_examples) -> float | None:
    if not eval_examples:
      return None
    totals = np.sum([np.asarray(eval_step(params, ex)[:2]) for ex in eval_examples], axis=0)
    return float(totals[0] / max(totals[1], 1.0))


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
  ProgressiveTrainer(config, progress=False, log=lambda _: None).load_checkpoint(builder, ckpt)
  return builder.build_rack()


class TrainingInterrupted(Exception):
  """SIGINT/SIGTERM stopped a run after it saved a checkpoint. args: (message, signal number)."""


@contextlib.contextmanager
def _saving_on_signals(trainer, enabled: bool):
  """While training with checkpoints, SIGINT/SIGTERM ask the trainer to save and stop after the
  current step instead of killing it (a second signal acts as usual)."""
  if not enabled or threading.current_thread() is not threading.main_thread():
    yield
    return
  previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

  def ask_to_stop(signum, frame):
    trainer._stop_signal = signum
    for sig, handler in previous.items():
      signal.signal(sig, handler)

  for sig in previous:
    signal.signal(sig, ask_to_stop)
  try:
    yield
  finally:
    for sig, handler in previous.items():
      signal.signal(sig, handler)


def stack_specs(specs) -> list[dict]:
  """Stack specs as they read back from JSON (tuples become lists)."""
  return json.loads(json.dumps([dataclasses.asdict(s) for s in specs]))


def _param_counts(params, labels) -> dict:
  """Trainable and frozen params (they add up to all params); `lora`: those in adapters."""
  counts = {"trainable": 0, "frozen": 0, "lora": 0}
  leaves = jax.tree_util.tree_leaves_with_path(params)
  for (path, x), label in zip(leaves, jax.tree.leaves(labels)):
    counts["trainable" if label == TRAINABLE else "frozen"] += x.size
    counts["lora"] += x.size if is_adapter_path(path) else 0
  return counts


def stack_memory(specs, params, opt_state) -> dict:
  """Per stack: bytes of base weights (int4 as packed half bytes, nvfp4 as stored packed),
  adapters and optimizer state.

  Optimizer state is attributed by path: every state leaf under `stacks/<name>` (Adam's mu and nu
  of that stack's trainable leaves; frozen leaves have none).
  """
  report = {s.name: {"precision": s.precision, "quantized": s.quantized, "packed": s.packed,
                     "base_bytes": 0,
                     "adapter_bytes": 0, "optimizer_bytes": 0} for s in specs}
  for path, x in jax.tree_util.tree_leaves_with_path(params["stacks"]):
    keys = plain_keys(path)
    report[keys[0]]["adapter_bytes" if is_adapter_path(keys) else "base_bytes"] += leaf_bytes(x)
  for path, x in jax.tree_util.tree_leaves_with_path(opt_state):
    keys = plain_keys(path)
    if "stacks" in keys[:-1] and keys[keys.index("stacks") + 1] in report:
      report[keys[keys.index("stacks") + 1]]["optimizer_bytes"] += leaf_bytes(x)
  return report


def _finite_mean(values) -> float | None:
  finite = [x for x in values if math.isfinite(x)]
  return float(np.mean(finite)) if finite else None


def _peak_device_memory() -> int | None:
  stats = jax.local_devices()[0].memory_stats() or {}
  return stats.get("peak_bytes_in_use")

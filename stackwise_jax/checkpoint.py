"""Runs that survive (design §9): orbax checkpoints of a progressive run in `workdir/checkpoints`.

An orbax step is the number of train steps done in the whole run, (stage - 1) * steps_per_stack +
step in the stage, so the end of stage s is step s * steps_per_stack (the final stage, last of all,
has its own final_stage_steps). Each checkpoint holds:
  params  the rack's params pytree as stored (int4, nvfp4 and adapter leaves included),
  opt     {"opt_state", "step"[, "dyn_scale"]} of the stage it was taken in,
  data    grain's train-iterator state, through grain's own handler (one file per process),
  meta    JSON: stage, step in the stage, the stage's steps, whether it is the final stage, the
          rack's structure, results so far and the config.
RNG needs no item: masks come from (example id, time step, seed) and dropout keys from
(seed, stage, step). A save returns once the arrays are copied to host memory and orbax writes
them on a background thread (training.async_checkpointing); it commits a step by renaming its
finished directory, so a run killed at any moment leaves only whole checkpoints behind.
"""
import contextlib
import dataclasses
import json
import logging
import os
import time
from typing import Any

from etils import epath
import grain
import jax
from jax.experimental import multihost_utils
import ml_collections
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from stackwise_jax.config import check_saveable, from_yaml, stage_steps, to_yaml, validate
from stackwise_jax.data.tokenizer import special_ids
from stackwise_jax.errors import ConfigError
from stackwise_jax.files import directory_bytes, file_error, require_free_space
from stackwise_jax.trees import key_path
from stackwise_jax.report import strict_json

# Config fields a resumed run may change: where and how often it reports and saves, and how far
# it grows. Every other field must match the checkpoint.
# A run that diverged may resume from its last finite checkpoint with a lower learning rate.
RESUMABLE_CHANGES = ("training.workdir", "training.eval_every", "training.log_every",
                     "training.lr", "training.nonfinite", "training.max_skipped_steps",
                     "training.checkpoint_every", "training.keep_checkpoints",
                     "training.async_checkpointing",
                     "training.progressive.target_stacks", "training.progressive.max_stacks",
                     "training.compilation_cache_dir", "training.compile_ahead",
                     "data.num_workers", "mesh.data",
                     "mesh.fsdp", "logging.wandb", "logging.wandb_project",
                     "logging.wandb_entity", "logging.wandb_run_name", "logging.wandb_tags",
                     "logging.wandb_notes", "logging.wandb_mode")
_ITEMS = ("params", "opt", "data", "meta")
_META_KEYS = ("stage", "step", "specs", "results", "progress", "config", "steps_per_stack")


@dataclasses.dataclass
class Checkpoint:
  """A checkpoint read back whole: arrays as orbax restores them without a target (dict keys
  become strings; `restore_into` puts them back into a pytree of the run's own structure)."""
  step: int
  path: str   # its directory, for messages
  meta: dict
  params: Any
  opt: Any
  data_state: dict   # this process's train-iterator state (grain's `get_state()`)

  @property
  def stage_done(self) -> bool:
    return self.meta["step"] == self.meta.get("stage_steps", self.meta["steps_per_stack"])

  @property
  def final(self) -> bool:
    """Whether it was taken in the final stage (`training.final_stage`)."""
    return self.meta.get("final", False)


class IteratorState:
  """What grain's checkpoint handler saves and restores for us: the `get_state()` of an iterator,
  taken when it was due (a cached stage resumes its data from the stage's start, where its cache
  was read). The handler passes a non-iterator's state as JSON bytes. Restoring into one checks
  the state reads back as grain's dict before the run relies on it."""

  def __init__(self, state: dict | None = None):
    self.state = state

  def get_state(self) -> bytes:
    return json.dumps(self.state, indent=4).encode()

  def set_state(self, state: bytes) -> None:
    self.state = json.loads(state)
    if not isinstance(self.state, dict):
      raise ValueError(f"data-iterator state: a JSON object expected, got {type(self.state)}")

  def start_prefetch(self) -> None:   # the handler calls it after set_state
    pass


class RunCheckpoints:
  """The checkpoints of one run in `workdir/checkpoints`: finds the latest readable one, refuses
  one from another config, and saves new ones.

  Keeps the latest `training.keep_checkpoints` and the end of every stage. An unreadable
  checkpoint is moved aside (`<step>.unreadable-<time>`, never deleted) with a warning and the one
  before it is used. `fresh=True` moves the existing checkpoints aside and starts over.

  `read_only=True` (eval, sample, export, plot: `open_run`) changes nothing on disk: an unreadable
  newest checkpoint is a ConfigError naming it and the newest readable step, and `step` makes
  that step the `latest`.
  """

  def __init__(self, workdir: str, config: ml_collections.ConfigDict, *, fresh: bool = False,
               log=print, read_only: bool = False, step: int | None = None):
    check_saveable(config)   # before any training, not at the first save
    self.config, self.log, self.read_only = config, log, read_only
    self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    if fresh and os.path.isdir(self.directory) and os.listdir(self.directory):
      aside = f"{self.directory}.replaced-{time.strftime('%Y%m%d-%H%M%S')}"
      _move_aside(self.directory, aside)
      log(f"--fresh: the previous checkpoints are kept in {aside}")
    refuse_linked_steps(self.directory)
    self._manager = self._open()
    self.latest = self._latest_readable() if step is None else self._read_step(step)
    if self.latest is not None:
      check_compatible(self.latest.meta, config, self.directory)

  def _open(self) -> ocp.CheckpointManager:
    t = self.config.training
    keep = policies.AnyPreservationPolicy([policies.LatestN(t.keep_checkpoints),
                                           policies.EveryNSteps(stage_steps(self.config))])
    options = ocp.CheckpointManagerOptions(enable_async_checkpointing=t.async_checkpointing,
                                           create=not self.read_only, read_only=self.read_only,
                                           preservation_policy=keep)
    handlers = {"params": ocp.StandardCheckpointHandler(), "opt": ocp.StandardCheckpointHandler(),
                "data": grain.checkpoint.CheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
    return ocp.CheckpointManager(epath.Path(self.directory), item_names=_ITEMS,
                                 item_handlers=handlers, options=options)

  def steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def read(self, step: int) -> Checkpoint:
    """One checkpoint, read whole: every item, so an unreadable one fails here."""
    restored = self._manager.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(), opt=ocp.args.StandardRestore(),
        data=grain.checkpoint.CheckpointRestore(IteratorState()), meta=ocp.args.JsonRestore()))
    meta = restored.meta
    missing = [k for k in _META_KEYS if not isinstance(meta, dict) or k not in meta]
    if missing:
      raise ValueError(f"its meta item lacks {', '.join(missing)}")
    return Checkpoint(step, os.path.join(self.directory, str(step)), meta,
                      restored.params, restored.opt, restored.data.state)

  def _latest_readable(self) -> Checkpoint | None:
    for step in reversed(self.steps()):
      try:
        return self.read(step)
      except Exception as e:   # orbax raises many types for a truncated or garbled step
        if self.read_only:
          raise self._unreadable(step, e) from None
        aside = os.path.join(self.directory, f"{step}.unreadable-{time.strftime('%Y%m%d-%H%M%S')}")
        _move_aside(os.path.join(self.directory, str(step)), aside)
        self.log(f"warning: checkpoint {self.directory}/{step} is unreadable "
                 f"({type(e).__name__}: {str(e)[:200]}); moved to {aside}, using the one before it")
        self._manager.close()
        self._manager = self._open()
    return None

  def _read_step(self, step: int) -> Checkpoint:
    """Checkpoint `step` (`--step`), or a ConfigError naming the steps there are."""
    if step not in self.steps():
      raise ConfigError(f"--step={step}: allowed: a checkpoint step of {self.directory} "
                        f"({', '.join(map(str, self.steps())) or 'none'})")
    return self.read_checked(step)

  def read_checked(self, step: int) -> Checkpoint:
    """`read`, with an unreadable checkpoint as a one-line ConfigError (`_unreadable`)."""
    try:
      return self.read(step)
    except Exception as e:   # orbax raises many types for a truncated or garbled step
      raise self._unreadable(step, e) from None

  def _unreadable(self, step: int, error: Exception) -> ConfigError:
    """What a reader says of an unreadable checkpoint: which, why, and the newest readable step
    to pass as --step (train moves an unreadable one aside and resumes from the one before)."""
    older = [s for s in self.steps() if s < step]
    good = next((s for s in reversed(older) if self._readable(s)), None)
    why = " ".join(str(error).split())[:200] or type(error).__name__
    hint = (f"--step {good} reads the newest good one" if good is not None
            else "no older checkpoint is readable")
    return ConfigError(f"checkpoint {self.directory}/{step} is unreadable ({type(error).__name__}: "
                       f"{why}); {hint}")

  def _readable(self, step: int) -> bool:
    try:
      self.read(step)
      return True
    except Exception:   # the same failures as in `_unreadable`
      return False

  def restore_data(self, iterator) -> None:
    """Sets a train iterator to the latest checkpoint's data state (grain's `set_state`)."""
    iterator.set_state(self.latest.data_state)

  def save(self, step: int, *, params, opt, data_state, meta: dict) -> None:
    """Saves one checkpoint (a step already saved is left as it is)."""
    if step in self._manager.all_steps():
      return
    # A checkpoint is about as large as the last one (or its arrays); a full disk is refused
    # before orbax starts writing, so no half-written step and no thread noise is left.
    steps = self.steps()
    last = directory_bytes(os.path.join(self.directory, str(steps[-1]))) if steps else 0
    arrays = sum(x.nbytes for x in jax.tree.leaves((params, opt)))
    require_free_space(self.directory, int(1.25 * max(last, arrays)) + 2**16,
                       f"checkpoint {step}")
    with self._naming_the_directory():
      self._manager.save(step, args=ocp.args.Composite(
          params=ocp.args.StandardSave(params), opt=ocp.args.StandardSave(opt),
          data=grain.checkpoint.CheckpointSave(IteratorState(data_state)),
          meta=ocp.args.JsonSave(strict_json({
              **meta, "config": to_yaml(self.config),
              "steps_per_stack": stage_steps(self.config)}))))

  def wait(self) -> None:
    """Returns once every save so far is on disk (with training.async_checkpointing, orbax writes
    them on a background thread); raises the error of one that failed."""
    with self._naming_the_directory():
      self._manager.wait_until_finished()

  def close(self) -> None:
    with self._naming_the_directory():
      self._manager.close()

  @contextlib.contextmanager
  def _naming_the_directory(self):
    """A disk that filled mid-write names the checkpoint directory where the file did not."""
    try:
      yield
    except Exception as e:
      error = file_error(e)
      if error is None or error.filename:
        raise
      raise OSError(error.errno, error.strerror, self.directory) from e


class _FileErrorsRaisedNotLogged(logging.Filter):
  """orbax logs a background write that failed, traceback and all, and raises its error at the
  next wait; a file error (a full disk) is reported there in one line, so its record is dropped."""

  def filter(self, record) -> bool:
    return not (record.exc_info and file_error(record.exc_info[1]) is not None)


logging.getLogger("absl").addFilter(_FileErrorsRaisedNotLogged())


def check_compatible(meta: dict, config, directory: str) -> None:
  """Raises ConfigError naming the first field where `config` differs from the checkpoint's (other
  than RESUMABLE_CHANGES), or when the checkpoint has more stacks than the config asks for."""
  stored, wanted = (_flat(_explicit_mask_id(c).to_dict())
                    for c in (from_yaml(meta["config"]), config))
  diff = sorted(k for k in stored.keys() | wanted.keys()
                if k not in RESUMABLE_CHANGES and stored.get(k) != wanted.get(k))
  if diff:
    raise ConfigError(
        f"{directory} holds a run with another config ({diff[0]}: {stored.get(diff[0])!r} there, "
        f"{wanted.get(diff[0])!r} now{f'; {len(diff) - 1} more' if len(diff) > 1 else ''}); "
        "resume with the same config, pass --fresh to start over, or choose another --workdir")
  stacks = len(meta["specs"])
  if meta.get("final") and stacks < config.training.progressive.target_stacks:
    raise ConfigError(
        f"training.progressive.target_stacks={config.training.progressive.target_stacks}: "
        f"{directory} holds a run that went on to its final stage with {stacks} stacks, and a "
        f"final stage ends a run; allowed: {stacks} (or --fresh)")
  if stacks > config.training.progressive.target_stacks:
    raise ConfigError(
        f"training.progressive.target_stacks={config.training.progressive.target_stacks}: "
        f"{directory} already holds a rack of {stacks} stacks; allowed: >= {stacks} (or --fresh)")


def _explicit_mask_id(config):
  """`config` with mask_token_id None (the tokenizer's) spelled out: runs saved when the default
  was the byte tokenizer's 257 resume under today's None."""
  if config.training.progressive.mask_token_id is not None:
    return config
  config = config.copy_and_resolve_references()
  config.training.progressive.mask_token_id = special_ids(config).mask
  return config


def open_run(workdir: str, step: int | None = None) -> RunCheckpoints:
  """The checkpoints of a finished or interrupted run, read-only, with the config they were
  written with; `latest` is checkpoint `step` if given. Raises ConfigError if `workdir` holds no
  readable checkpoint, if the newest (or `step`) is unreadable, or `step` is not one."""
  config = read_config(workdir)
  return RunCheckpoints(workdir, config, log=lambda _: None, read_only=True, step=step)


def read_config(workdir: str) -> ml_collections.ConfigDict:
  """The config of the run in `workdir`, from its latest readable checkpoint."""
  step, meta = latest_meta(workdir)
  return validate(from_yaml(meta["config"], os.path.join(workdir, "checkpoints", str(step))))


def latest_meta(workdir: str) -> tuple[int, dict]:
  """(step, meta item) of the newest checkpoint in `workdir` whose meta item reads, read-only."""
  directory = os.path.join(os.path.abspath(workdir), "checkpoints")
  if not os.path.isdir(directory):
    raise ConfigError(f"{workdir}: no readable checkpoint ({directory} does not exist)")
  refuse_linked_steps(directory)
  manager = ocp.CheckpointManager(epath.Path(directory), item_names=("meta",),
                                  item_handlers={"meta": ocp.JsonCheckpointHandler()},
                                  options=ocp.CheckpointManagerOptions(create=False,
                                                                       read_only=True))
  try:
    for step in sorted(manager.all_steps(), reverse=True):
      try:
        meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
        if isinstance(meta, dict) and all(k in meta for k in _META_KEYS):
          return step, meta
      except Exception:   # unreadable: RunCheckpoints will say so (or move it aside, in train)
        continue
  finally:
    manager.close()
  raise ConfigError(f"{workdir}: no readable checkpoint in {directory}")


def refuse_linked_steps(directory: str) -> None:
  """Raises ConfigError if an entry of the checkpoint directory is a symbolic link: orbax would
  read through it and, when the step ages out, delete what it points to."""
  if not os.path.isdir(directory):
    return
  links = sorted(e.name for e in os.scandir(directory) if e.is_symlink())
  if links:
    raise ConfigError(f"{os.path.join(directory, links[0])} is a symbolic link; checkpoint steps "
                      "must be directories of their own (a link is neither followed nor "
                      f"deleted): move it out of {directory}")


_OTHER_VERSION = ("; a checkpoint written by another version of stackwise-jax? pass --fresh to "
                  "start over, or choose another --workdir")


def restore_into(target, restored, what: str):
  """Returns `target`'s pytree with every leaf taken from `restored` at the same key path (orbax's
  untargeted restore names list indices and int keys as strings). Raises ConfigError naming the
  first path that is missing or has another shape or dtype."""
  by_path = {key_path(p): x for p, x in jax.tree_util.tree_flatten_with_path(restored)[0]}
  leaves = jax.tree_util.tree_flatten_with_path(target)[0]
  if len(by_path) != len(leaves):
    raise ConfigError(f"checkpoint {what}: {len(by_path)} arrays there, {len(leaves)} expected"
                      f"{_OTHER_VERSION}")
  out = []
  for path, want in leaves:
    got = by_path.get(key_path(path))
    if got is None or got.shape != want.shape or got.dtype != want.dtype:
      found = "missing" if got is None else f"{got.dtype}{list(got.shape)}"
      raise ConfigError(f"checkpoint {what} at {key_path(path)}: {found}, expected "
                        f"{want.dtype}{list(want.shape)}{_OTHER_VERSION}")
    out.append(got)
  return jax.tree.unflatten(jax.tree.structure(target), out)


def _move_aside(path: str, aside: str) -> None:
  """Renames `path` once however many hosts share the directory. Every host has seen `path` before
  it moves (they all decide alike), and it has moved before any host goes on."""
  sync = jax.process_count() > 1
  if sync:
    multihost_utils.sync_global_devices(f"found {path}")
  if jax.process_index() == 0:
    os.rename(path, aside)
  if sync:
    multihost_utils.sync_global_devices(f"moved {path}")


def _flat(d, prefix=""):
  out = {}
  for key, value in d.items():
    if isinstance(value, dict):
      out.update(_flat(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = _plain(value)
  return out


def _plain(value):
  """Tuples as lists at any depth (data.mixture's entries hold paths, mixture_by_stage rows): a
  config read back from its YAML compares equal to the one given on the command line."""
  if isinstance(value, (tuple, list)):
    return [_plain(v) for v in value]
  if isinstance(value, dict):
    return {k: _plain(v) for k, v in value.items()}
  return value

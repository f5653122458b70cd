"""A run's metrics (design §12): TensorBoard event files (tensorboardX), and Weights & Biases where
`logging.wandb` asks for it (the optional `wandb` extra, imported only then).

Tags: `train/loss` every `training.log_every` steps, `eval/loss` and `eval/bits_per_byte` at every
evaluation, against the run's global step ((stage - 1) * steps_per_stack + step); `stage/*` (eval
loss, eval bits per byte, tokens/s, step time, trainable params, memory) once per stage, against
the stage number, so the last plot is eval loss against depth. The trainer names the step tags and
`stage_scalars` the stage ones; `Metrics` hands both to every writer, so the writers cannot drift.
"""
import json
import os
import sys

from stackwise_jax.errors import ConfigError


def _summary_writer():
  """tensorboardX's SummaryWriter. tensorboardX imports torch (2-3 s of every run's start-up)
  only to recognise torch tensors; we log floats, so where torch is not loaded yet it is hidden
  from that import."""
  if "torch" in sys.modules:
    from tensorboardX import SummaryWriter
    return SummaryWriter
  sys.modules["torch"] = None   # `import torch` raises ImportError while this is set
  try:
    from tensorboardX import SummaryWriter
  finally:
    del sys.modules["torch"]
  return SummaryWriter


def stage_scalars(result: dict) -> dict[str, float]:
  """The `stage/*` scalars of a finished stage (a `ProgressiveTrainer` stage result): the one
  definition every writer logs."""
  memory = sum(m["base_bytes"] + m["adapter_bytes"] + m["optimizer_bytes"]
               for m in result["memory"].values())
  figures = {"eval_loss": result["eval_loss"],
             "eval_bits_per_byte": result.get("eval_bits_per_byte"),
             "tokens_per_s": result["tokens_per_s"],
             "step_seconds": result["step_seconds"], "trainable_params": result["trainable_params"],
             "params_and_optimizer_mib": memory / 2**20}
  return {f"stage/{name}": value for name, value in figures.items() if value is not None}


class TensorBoard:
  """Scalars into `logdir` (e.g. WORKDIR/tensorboard; `tensorboard --logdir WORKDIR`)."""

  def __init__(self, logdir: str):
    self.logdir = logdir
    self._writer = _summary_writer()(logdir)

  def scalar(self, tag: str, value: float, step: int) -> None:
    self._writer.add_scalar(tag, value, step)

  def stage(self, result: dict) -> None:
    """A finished stage's figures (a `ProgressiveTrainer` stage result), against its number."""
    for tag, value in stage_scalars(result).items():
      self.scalar(tag, value, result["stage"])
    self._writer.flush()

  def close(self) -> None:
    self._writer.close()


WANDB_EXTRA = "pip install 'stackwise-jax[wandb]'"
RUN_ID_FILE = "wandb_run.json"   # in the workdir: the W&B run a resumed run continues


def wandb_wanted(config) -> bool:
  """Whether `config` logs to W&B: `logging.wandb`, unless `logging.wandb_mode` is "disabled"."""
  return config.logging.wandb and config.logging.wandb_mode != "disabled"


def check_wandb(config) -> None:
  """Raises ConfigError (one line naming the extra) if `config` asks for W&B and the wandb
  package is not installed: `train` calls it before any work."""
  if wandb_wanted(config):
    try:
      import wandb  # noqa: F401
    except ImportError as e:
      raise ConfigError(f"logging.wandb=True: needs the wandb extra: {WANDB_EXTRA}") from e


class WandB:
  """A W&B run with TensorBoard's interface (`scalar`, `stage`, `close`), plus `end`.

  The run's id is kept in WORKDIR/wandb_run.json: a run resumed from a checkpoint continues the
  same W&B run (`resume="allow"`); a run that starts from no checkpoint gets a new id. Its files
  go under WORKDIR/wandb/. Step scalars use the run's global step; `stage/*` use W&B's own step
  metric `stage` (`define_metric`), so they do not clash with the global step."""

  def __init__(self, config, workdir: str, resumed: bool, stages: list[dict] = ()):
    """`resumed`: the run continues from a checkpoint; `stages`: its finished stages' results."""
    import wandb
    from stackwise_jax.report import write_json
    self._wandb = wandb
    log = config.logging
    id_path = os.path.join(workdir, RUN_ID_FILE)
    run_id = _stored_run_id(id_path) if resumed else None   # None: W&B draws a new one
    try:
      self.run = wandb.init(
          id=run_id, resume="allow", dir=workdir, project=log.wandb_project,
          entity=log.wandb_entity or None,
          name=log.wandb_run_name or os.path.basename(os.path.abspath(workdir)),
          tags=list(log.wandb_tags), notes=log.wandb_notes or None, mode=log.wandb_mode,
          config=json.loads(json.dumps(config.to_dict(), default=str)), allow_val_change=True)
    except wandb.errors.Error as e:   # not logged in, no connection, ...
      raise ConfigError(f"logging.wandb=True: W&B did not start: {e} (`wandb login`, or "
                        "logging.wandb_mode=offline to sync later)") from e
    if self.run.id != run_id:
      write_json(id_path, {"id": self.run.id})
    self.run.define_metric("stage")
    self.run.define_metric("stage/*", step_metric="stage")
    # A run resumed from a checkpoint before its last logged step repeats those steps: W&B keeps
    # the first values (the same ones) and would warn about each repeat.
    self._first_step = self.run.starting_step
    self._stages = list(stages)

  def scalar(self, tag: str, value: float, step: int) -> None:
    if step >= self._first_step:
      self.run.log({tag: value}, step=step)

  def stage(self, result: dict) -> None:
    """A finished stage: its `stage/*` scalars against `stage`, and the summary table's rows of
    the stages so far (the `stages` table)."""
    from stackwise_jax.report import summary_rows
    self._stages.append(result)
    headers, rows = summary_rows(self._stages)
    # At the stage's last step, named: W&B keeps that row open, so scalars logged at the same step
    # after it (a mixture's eval by source at the run's end) join it instead of being dropped.
    self.run.log({"stage": result["stage"], **stage_scalars(result),
                  "stages": self._wandb.Table(columns=headers, data=rows)},
                 step=sum(s["steps"] for s in self._stages))

  def end(self, results: dict, plots: list[str]) -> None:
    """The finished run: its final eval loss and bits per byte, the `stages` table as in
    results.json (the last checkpoint's seconds are counted after its stage was logged), and the
    PNG plots as images."""
    from stackwise_jax.report import summary_rows
    for key in ("final_eval_loss", "final_eval_bits_per_byte"):
      if results.get(key) is not None:
        self.run.summary[key] = results[key]
    headers, rows = summary_rows(results["stages"])
    self.run.log({"stages": self._wandb.Table(columns=headers, data=rows),
                  **{f"plots/{os.path.splitext(os.path.basename(p))[0]}": self._wandb.Image(p)
                     for p in plots}})

  def close(self) -> None:
    self.run.finish()


def _stored_run_id(path: str) -> str | None:
  try:
    with open(path) as f:
      run_id = json.load(f).get("id")
  except (OSError, ValueError, AttributeError):   # none there, or damaged: a new W&B run
    return None
  return run_id if isinstance(run_id, str) and run_id else None


class Metrics:
  """Every scalar to each of `writers` (TensorBoard, W&B): what the trainer's `metrics` takes."""

  def __init__(self, writers: list):
    self.writers = writers

  def scalar(self, tag: str, value: float, step: int) -> None:
    for writer in self.writers:
      writer.scalar(tag, value, step)

  def stage(self, result: dict) -> None:
    for writer in self.writers:
      writer.stage(result)

  def close(self) -> None:
    for writer in self.writers:
      writer.close()

"""TensorBoard event files of a run (design §12), written with tensorboardX as training goes.

Tags: `train/loss` every `training.log_every` steps, `eval/loss` and `eval/bits_per_byte` at every
evaluation, against the run's global step ((stage - 1) * steps_per_stack + step); `stage/*` (eval
loss, eval bits per byte, tokens/s, step time, trainable params, memory) once per stage, against
the stage number, so the last plot is eval loss against depth.
"""
import sys


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


class TensorBoard:
  """Scalars into `logdir` (e.g. WORKDIR/tensorboard; `tensorboard --logdir WORKDIR`)."""

  def __init__(self, logdir: str):
    self.logdir = logdir
    self._writer = _summary_writer()(logdir)

  def scalar(self, tag: str, value: float, step: int) -> None:
    self._writer.add_scalar(tag, value, step)

  def stage(self, result: dict) -> None:
    """A finished stage's figures (a `ProgressiveTrainer` stage result)."""
    memory = sum(m["base_bytes"] + m["adapter_bytes"] + m["optimizer_bytes"]
                 for m in result["memory"].values())
    figures = {"eval_loss": result["eval_loss"],
               "eval_bits_per_byte": result.get("eval_bits_per_byte"),
               "tokens_per_s": result["tokens_per_s"],
               "step_seconds": result["step_seconds"], "trainable_params": result["trainable_params"],
               "params_and_optimizer_mib": memory / 2**20}
    for name, value in figures.items():
      if value is not None:
        self.scalar(f"stage/{name}", value, result["stage"])
    self._writer.flush()

  def close(self) -> None:
    self._writer.close()

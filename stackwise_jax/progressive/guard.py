"""What a run does when a step diverges (`training.nonfinite`).

The train step drops a non-finite update itself (optax.apply_if_finite), so params and optimizer
state stay finite; the guard decides whether the run goes on. It reads each step's verdict one step
late, after the next step is dispatched, so the host never waits on the step it just queued.
"""
import math

class TrainingDiverged(Exception):
  """A stage's loss or gradients became NaN or Inf (`training.nonfinite`). args: (message,)."""


class DivergenceGuard:
  """Judges the steps of one stage in order; raises TrainingDiverged when the run must stop.

  "stop": at the first non-finite step. "skip": that step's update is dropped and training goes
  on, until `max_skipped` steps in a row were skipped.
  """

  def __init__(self, mode: str, max_skipped: int, stage: int, losses: list, skipped: int = 0):
    """`losses`, `skipped`: the stage's losses and skipped steps so far (a resumed stage)."""
    self.mode, self.max_skipped, self.stage = mode, max_skipped, stage
    self.skipped = skipped    # steps of this stage whose update was dropped
    self._in_a_row = 0
    self._pending = None      # (step in the stage, metrics) not judged yet
    self._last_finite = next(((i + 1, x) for i, x in reversed(list(enumerate(losses)))
                              if x is not None and math.isfinite(x)), None)

  def after(self, step: int, metrics: dict) -> None:
    """Call right after dispatching `step` (1-based in the stage); judges the step before it."""
    pending, self._pending = self._pending, (step, metrics)
    if pending is not None:
      self._judge(*pending)

  def flush(self) -> None:
    """Judges the step still pending: before a checkpoint, an eval or the end of the stage."""
    pending, self._pending = self._pending, None
    if pending is not None:
      self._judge(*pending)

  def _judge(self, step: int, metrics: dict) -> None:
    loss = float(metrics["loss"])
    if bool(metrics["finite"]):
      self._in_a_row = 0
      self._last_finite = (step, loss)
      return
    self.skipped += 1
    self._in_a_row += 1
    if self.mode == "stop" or self._in_a_row >= self.max_skipped:
      last = (f"last finite loss {self._last_finite[1]:.4g} at step {self._last_finite[0]}"
              if self._last_finite else "no finite loss in this stage")
      why = ("" if self.mode == "stop" else
             f" ({self._in_a_row} steps in a row skipped, training.max_skipped_steps="
             f"{self.max_skipped})")
      raise TrainingDiverged(
          f"stage {self.stage} diverged at step {step}: "
          f"{'gradients' if math.isfinite(loss) else f'loss {loss}'} not finite{why}; {last}. Nothing "
          "non-finite was saved: the latest checkpoint is the last finite state. Try a lower "
          "training.lr (a resumed run may change it), training.grad_clip > 0, or another "
          "training.progressive.new_stack_precision")

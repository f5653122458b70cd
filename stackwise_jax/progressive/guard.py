"""What a run does when a step diverges (`training.nonfinite`).

The train step drops a non-finite update itself (optax.apply_if_finite), so params and optimizer
state stay finite; the guard decides whether the run goes on. Each step's loss and verdict stay on
the device until the guard reads them: every `read_every` steps (training.log_every), all the
steps pending in one transfer, one step late (after the next step is dispatched, so the host never
waits on the step it just queued); and all of them before a checkpoint, an eval or the end of the
stage (`flush`), so nothing after a non-finite step is ever saved or evaluated under "stop".
"""
import math

from stackwise_jax.trees import fetch_stacked


class TrainingDiverged(Exception):
  """A stage's loss or gradients became NaN or Inf (`training.nonfinite`). args: (message,)."""


def read_steps(pending: list) -> tuple:
  """The losses (float [n]) and verdicts (bool [n]) of `pending` steps' metrics
  ({"loss", "finite"} on the device), in one transfer."""
  read = fetch_stacked([{"loss": m["loss"], "finite": m["finite"]} for m in pending])
  return read["loss"], read["finite"]


class DivergenceGuard:
  """Reads and judges the steps of one stage in order; raises TrainingDiverged when the run must
  stop.

  "stop": at the first non-finite step. "skip": that step's update is dropped and training goes
  on, until `max_skipped` steps in a row were skipped. Steps left unread when it raises were
  computed but never saved: the caller flushes before every checkpoint.
  """

  def __init__(self, mode: str, max_skipped: int, stage: int, losses: list, skipped: int = 0,
               read_every: int = 1, on_loss=None):
    """`losses`: the stage's losses so far (a resumed stage), appended to as steps are read;
    `skipped`: its skipped steps so far. `on_loss(step, loss)`: called as each step is read,
    before it is judged."""
    self.mode, self.max_skipped, self.stage = mode, max_skipped, stage
    self.losses, self.read_every, self.on_loss = losses, read_every, on_loss
    self.skipped = skipped    # steps of this stage whose update was dropped
    self._in_a_row = 0
    self._pending = []        # [(step in the stage, metrics on the device)] not read yet
    self._last_finite = next(((i + 1, x) for i, x in reversed(list(enumerate(losses)))
                              if x is not None and math.isfinite(x)), None)

  def after(self, step: int, metrics: dict) -> None:
    """Call right after dispatching `step` (1-based in the stage): once `read_every` steps before
    it are pending, reads and judges them."""
    self._pending.append((step, metrics))
    if len(self._pending) > self.read_every:
      self._read(self._pending[:-1])
      self._pending = self._pending[-1:]

  def flush(self) -> None:
    """Reads and judges every step still pending: before a checkpoint, an eval or the end of the
    stage."""
    pending, self._pending = self._pending, []
    if pending:
      self._read(pending)

  def _read(self, pending: list) -> None:
    losses, finite = read_steps([metrics for _, metrics in pending])
    for (step, _), loss, ok in zip(pending, losses.tolist(), finite.tolist()):
      self.losses.append(loss)
      if self.on_loss is not None:
        self.on_loss(step, loss)
      self._judge(step, loss, ok)

  def _judge(self, step: int, loss: float, finite: bool) -> None:
    if finite:
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

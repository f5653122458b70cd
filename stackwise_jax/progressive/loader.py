"""`ProgressiveDataLoader`: the original StackWise's per-stage view of a dataloader, for users who
drive stages themselves. The trainer does not need it (it prepares its examples itself)."""
from collections.abc import Callable, Mapping

from stackwise_jax.data.iterable import as_batch, restartable


class ProgressiveDataLoader:
  """Iterates `base_dataloader` (any re-iterable of batch dicts, ours or the original's keys:
  data/iterable.py) and yields the examples of the stage that trains stack `stack_idx`: masked
  inputs, targets, loss mask and time steps as `masking_strategy` (a `TimeStepMasking`) makes them,
  plus `"h"`, the trunk's activations, when `trunk_activations` is given: a function
  example -> h [B, T, d_model] (e.g. a jitted frozen-prefix forward) or a mapping from a batch's
  position in the stream to its h. With `cache_activations` a function's h is kept by position, so
  a second pass over the data reads it instead of running the trunk again."""

  def __init__(self, base_dataloader, masking_strategy, stack_idx: int = 0,
               trunk_activations: Callable | Mapping | None = None,
               cache_activations: bool = True):
    self._batches = restartable(base_dataloader, "base_dataloader")
    self.masking_strategy, self.stack_idx = masking_strategy, stack_idx
    self.trunk_activations, self.cache_activations = trunk_activations, cache_activations
    self.activation_cache: dict[int, object] = {}

  def __iter__(self):
    first_example = 0
    for position, raw in enumerate(self._batches()):
      batch = as_batch(raw, first_example, pad_id=self.masking_strategy.pad_id)
      first_example += batch["tokens"].shape[0]
      example = self.masking_strategy.generate_masks_for_stack(batch, self.stack_idx)
      if self.trunk_activations is not None:
        example["h"] = self._activations(position, example)
      yield example

  def _activations(self, position: int, example: dict):
    if isinstance(self.trunk_activations, Mapping):
      return self.trunk_activations[position]
    if position in self.activation_cache:
      return self.activation_cache[position]
    h = self.trunk_activations(example)
    if self.cache_activations:
      self.activation_cache[position] = h
    return h

"""Activation cache (design §8): the frozen prefix's outputs for every step of a stage.

Entries are [batch, seq, d_model] fp32 arrays. The first ones live in host memory up to
`max_bytes`; the rest go to one memory-mapped file that is deleted when the cache is closed.
"""
import os
import tempfile

import numpy as np


class ActivationCache:
  """A fixed number of equally-shaped activation entries, in memory then on disk."""

  def __init__(self, num_entries: int, entry_shape: tuple[int, ...], max_bytes: int,
               spill_dir: str | None = None, dtype=np.float32):
    self.entry_shape, self.dtype = tuple(entry_shape), np.dtype(dtype)
    self.entry_bytes = int(np.prod(entry_shape)) * self.dtype.itemsize
    self.num_in_memory = min(num_entries, max_bytes // self.entry_bytes)
    self._memory = np.empty((self.num_in_memory, *entry_shape), self.dtype)
    self._disk = None
    self._path = None
    num_on_disk = num_entries - self.num_in_memory
    if num_on_disk:
      if spill_dir:
        os.makedirs(spill_dir, exist_ok=True)
      fd, self._path = tempfile.mkstemp(prefix="activations-", suffix=".bin", dir=spill_dir)
      os.close(fd)
      self._disk = np.memmap(self._path, self.dtype, "w+", shape=(num_on_disk, *entry_shape))
    self.examples: list[dict] = [None] * num_entries   # the masked batch each entry came from

  def __len__(self) -> int:
    return len(self.examples)

  def put(self, i: int, activations: np.ndarray, example: dict) -> None:
    store, j = self._slot(i)
    store[j] = activations
    self.examples[i] = example

  def get(self, i: int) -> tuple[np.ndarray, dict]:
    store, j = self._slot(i)
    return np.asarray(store[j]), self.examples[i]

  def _slot(self, i):
    if i < self.num_in_memory:
      return self._memory, i
    return self._disk, i - self.num_in_memory

  @property
  def bytes_in_memory(self) -> int:
    return self._memory.nbytes

  @property
  def bytes_on_disk(self) -> int:
    return 0 if self._disk is None else self._disk.nbytes

  @property
  def nbytes(self) -> int:
    return self.bytes_in_memory + self.bytes_on_disk

  def close(self) -> None:
    """Frees memory and deletes the spill file."""
    self._memory = np.empty((0, *self.entry_shape), self.dtype)
    if self._disk is not None:
      del self._disk
      self._disk = None
      os.remove(self._path)

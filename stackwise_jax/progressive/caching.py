"""Activation cache (design §8): the frozen prefix's outputs for every example of a stage.

Entries are [batch, seq, d_model] arrays in the compute dtype of the prefix's last stack (a bf16
trunk's cache is bf16: rounded to the precision the trunk computes in, at half the bytes). The
first ones stay on the accelerator, as the prefix made them, up to `device_bytes`; the next live in
host memory up to `max_bytes`; the rest go to one memory-mapped file that is deleted when the
cache is closed. `PrefixRunner` computes them one stack at a time, rounding to
each stack's cache dtype as storing would, so a cache built from scratch and one extended stage by
stage (cache(k+1) = stack k (cache(k))) agree bit for bit.
"""
import functools
import os
import tempfile

from flax import nnx
import jax
import numpy as np

from stackwise_jax.model.layers import Segments
from stackwise_jax.progressive import ahead

# Compiled prefix functions kept, by stack structure: a run has a handful of stack shapes; a
# process that builds many racks (benchmarks, tests) must not keep every one it ever compiled.
_COMPILED_KEPT = 32


@functools.lru_cache(maxsize=_COMPILED_KEPT)
def _embed_fn(graphdef):
  return jax.jit(lambda params, inputs, time_step:
                 nnx.merge(graphdef, params).embed_tokens(inputs, time_step)[0])


@functools.lru_cache(maxsize=_COMPILED_KEPT)
def _time_fn(graphdef):
  return jax.jit(lambda params, time_step: nnx.merge(graphdef, params).time_embedding(time_step))


@functools.lru_cache(maxsize=_COMPILED_KEPT)
def _stack_fn(graphdef):
  return jax.jit(lambda params, h, time_emb, segments:
                 nnx.merge(graphdef, params)(h, time_emb, segments=segments))


class PrefixRunner:
  """The frozen prefix of a rack, run one stack at a time with one compiled function per stack
  shape. Examples are dicts as `TimeStepMasking.example` makes them (their segments, with
  data.packing="documents", mask the attention; an entry keeps its example, so a cached stage
  sees the same segments); h: [B, T, d_model]."""

  def __init__(self, rack):
    self.rack = rack

  def build(self, params, names, example):
    """Embedding, then the stacks `names` in order, each output rounded to its cache dtype as
    a stored and extended cache would be (fp32 stacks: no rounding)."""
    h = _embed_fn(self.rack.graphdefs["embed_head"])(params["embed_head"], example["inputs"],
                                                     example["time_step"])
    for i, name in enumerate(names):
      h = self.extend(params, name, h, example)
      if i + 1 < len(names):
        h = h.astype(cache_dtype(self.rack, names[:i + 1]))
    return h

  def compile(self, params, names, example):
    """Compiles `build`'s programs ahead (progressive/ahead.py) for abstract `params` and
    `example` (`jax.ShapeDtypeStruct`s with shardings). Returns `build`'s output, abstract."""
    embed = self.rack.graphdefs["embed_head"]
    h = ahead.compile(_embed_fn(embed), params["embed_head"], example["inputs"],
                      example["time_step"])
    time_emb = ahead.compile(_time_fn(embed), params["embed_head"], example["time_step"])
    for i, name in enumerate(names):
      h = ahead.compile(_stack_fn(self.rack.graphdefs[name]), params["stacks"][name], h, time_emb,
                        Segments.of(example))
      if i + 1 < len(names):
        h = jax.ShapeDtypeStruct(h.shape, cache_dtype(self.rack, names[:i + 1]),
                                 sharding=h.sharding)
    return h

  def extend(self, params, name, h, example):
    """One more stack on top of activations `h` of `example`."""
    time_emb = _time_fn(self.rack.graphdefs["embed_head"])(params["embed_head"],
                                                            example["time_step"])
    return _stack_fn(self.rack.graphdefs[name])(params["stacks"][name], h, time_emb,
                                                 Segments.of(example))


def cache_dtype(rack, names) -> np.dtype:
  """The compute dtype of the prefix's last stack: its output holds exactly such values."""
  last = next(s for s in rack.specs if s.name == names[-1])
  return np.dtype(last.compute_dtype)


def device_budget(configured: int | None) -> int:
  """Bytes of cache the accelerators may hold: `configured`, or for None a quarter of the local
  devices' memory on a GPU/TPU (an H200's quarter holds a 1B-parameter job's 3 GiB cache many times
  over; the rest is the step's) and none on a CPU, whose "device" is host memory."""
  if configured is not None:
    return configured
  devices = jax.local_devices()
  if devices[0].platform == "cpu":
    return 0
  return sum((d.memory_stats() or {}).get("bytes_limit", 0) for d in devices) // 4


class ActivationCache:
  """A fixed number of equally-shaped activation entries: on the devices, in host memory, then on
  disk. Entries on the devices are kept as given (global jax arrays, with their example); the
  others as this host's share in numpy. `on_device(i)` says which an entry is."""

  def __init__(self, num_entries: int, entry_shape: tuple[int, ...], max_bytes: int,
               spill_dir: str | None = None, dtype=np.float32, device_bytes: int = 0):
    self.entry_shape, self.dtype = tuple(entry_shape), np.dtype(dtype)
    self.entry_bytes = int(np.prod(entry_shape)) * self.dtype.itemsize
    self.num_on_device = min(num_entries, device_bytes // self.entry_bytes)
    self._device = [None] * self.num_on_device
    num_entries -= self.num_on_device
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
    # the masked batch each entry came from
    self.examples: list[dict] = [None] * (self.num_on_device + num_entries)

  def __len__(self) -> int:
    return len(self.examples)

  def on_device(self, i: int) -> bool:
    return i < self.num_on_device

  def put(self, i: int, activations, example: dict) -> None:
    store, j = self._slot(i)
    store[j] = activations
    self.examples[i] = example

  def get(self, i: int) -> tuple:
    store, j = self._slot(i)
    return (store[j] if self.on_device(i) else np.asarray(store[j])), self.examples[i]

  def _slot(self, i):
    if self.on_device(i):
      return self._device, i
    i -= self.num_on_device
    if i < self.num_in_memory:
      return self._memory, i
    return self._disk, i - self.num_in_memory

  @property
  def bytes_on_device(self) -> int:
    return self.num_on_device * self.entry_bytes

  @property
  def bytes_in_memory(self) -> int:
    return self._memory.nbytes

  @property
  def bytes_on_disk(self) -> int:
    return 0 if self._disk is None else self._disk.nbytes

  @property
  def nbytes(self) -> int:
    return self.bytes_on_device + self.bytes_in_memory + self.bytes_on_disk

  def close(self) -> None:
    """Frees device and host memory and deletes the spill file."""
    self._device = [None] * self.num_on_device
    self.examples = [None] * len(self.examples)
    self._memory = np.empty((0, *self.entry_shape), self.dtype)
    if self._disk is not None:
      del self._disk
      self._disk = None
      os.remove(self._path)

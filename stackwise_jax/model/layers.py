"""Building blocks of a transformer block: RoPE attention (MHA/GQA), SwiGLU, time embedding.

Kernels are `Linear` (an `nnx.Linear`) so that qwix can intercept their `dot_general` for int4 and
the stack LoRA (model/lora.py). Every layer takes a compute `dtype`; params keep their own storage
dtype. Each param declares the logical axes of its dims where it is created (sharding.py).
"""
import math
import os
import sys
from typing import NamedTuple

from flax import nnx
import jax
import jax.numpy as jnp

from stackwise_jax.quant import FORMATS, Format
from stackwise_jax.sharding import axes, kernel_leaf_axes


def rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
  """Rotary position embedding. x: [batch, seq, heads, head_dim]; positions: [seq], or
  [batch, seq] (each row its own: documents packed in a row)."""
  half = x.shape[-1] // 2
  freqs = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)          # [half]
  angles = positions.astype(jnp.float32)[..., None] * freqs               # [(batch,) seq, half]
  sin, cos = jnp.sin(angles)[..., None, :], jnp.cos(angles)[..., None, :]   # [(b,) seq, 1, half]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


def dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
  """Inverted dropout; a no-op without a key (evaluation, frozen stacks)."""
  if key is None or rate == 0.0:
    return x
  keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)


class Linear(nnx.Linear):
  """A bias-free `nnx.Linear` that can carry a progressive LoRA adapter (design §6) and compute
  with its kernel in a stored format that quantizes itself (design §5, `quant.Format.quantize`).

  `kernel_axes`: the logical axes of the kernel's (in, out) dims (sharding.py).
  `adapter` is a flax `nnx.LoRA` (B = 0 at init, so adding it changes nothing) whose output is
  scaled by alpha / rank; it is attached by `add_adapter` when the stack becomes trunk.
  `stored_format` is None, or (format name, stored): a trainable kernel fake-quantized at every
  call, or (frozen) `kernel` replaced by the format's leaves, dequantized at compute.
  """

  def __init__(self, in_features: int, out_features: int, kernel_axes: tuple, *, dtype,
               rngs: nnx.Rngs):
    super().__init__(in_features, out_features, use_bias=False, dtype=dtype,
                     kernel_metadata=axes(*kernel_axes), rngs=rngs)
    self.adapter = nnx.data(None)
    self.adapter_scale = 0.0
    self.stored_format = None

  def use_format(self, fmt: Format, *, stored: bool) -> None:
    """Fake-quantizes the kernel from now on, or (`stored`) replaces it by its leaves in `fmt`."""
    self.stored_format = (fmt.name, stored)
    if stored:
      for leaf, value in fmt.quantize(self.kernel[...]).items():
        setattr(self, leaf, nnx.Param(value, **kernel_leaf_axes(leaf, self._kernel_axes())))
      self.kernel = nnx.data(None)

  def _kernel(self) -> jax.Array:
    """The kernel [in, out] as this layer computes with it."""
    name, stored = self.stored_format
    fmt = FORMATS[name]
    if stored:
      return fmt.dequantize({leaf: getattr(self, leaf)[...] for leaf in fmt.leaves}, self.dtype)
    return fmt.fake_quantize(self.kernel[...]).astype(self.dtype)

  def _kernel_axes(self) -> tuple:
    return self.kernel.get_metadata()["out_sharding"]

  def add_adapter(self, rank: int, alpha: float, rngs: nnx.Rngs) -> None:
    self.adapter = nnx.LoRA(self.in_features, rank, self.out_features, dtype=self.dtype,
                            a_metadata=kernel_leaf_axes("lora_a", self._kernel_axes()),
                            b_metadata=kernel_leaf_axes("lora_b", self._kernel_axes()), rngs=rngs)
    self.adapter_scale = alpha / rank

  def __call__(self, x: jax.Array) -> jax.Array:
    # One [tokens, in] @ [in, out] matmul: XLA:CPU runs the weight gradient of a [batch, seq, in]
    # input (two contracting axes) ~1.4x slower (scripts/bench.py mfu, "matmuls of a block").
    lead, x = x.shape[:-1], x.reshape(-1, x.shape[-1])
    # nnx.Linear's own path keeps the kernel param visible to qwix's dot_general interception.
    y = (super().__call__(x) if self.stored_format is None
         else x.astype(self.dtype) @ self._kernel())
    if self.adapter is not None:
      y = y + (self.adapter(x) * self.adapter_scale).astype(y.dtype)
    return y.reshape(*lead, y.shape[-1])


def causal_query_chunks(seq: int) -> list[tuple[int, int]]:
  """How `attend` splits a causal sequence's queries on CPU: [(start, end), ...]; queries
  start..end-1 score keys 0..end-1 only. One chunk (no split) elsewhere or for short sequences.

  XLA:CPU materializes the [batch, heads, seq, seq] scores in memory; in at most 8 chunks of at
  least 32 queries they stay in cache and the chunks skip the keys the causal mask would hide
  (about half of them): the attention of `configs/small.py` runs ~1.5x faster (BUILD_NOTES).
  """
  n = min(8, seq // 32) if jax.default_backend() == "cpu" else 1
  bounds = [round(i * seq / n) for i in range(n + 1)] if n > 1 else [0, seq]
  return list(zip(bounds[:-1], bounds[1:]))


def attention_scores(seq: int, causal: bool) -> int:
  """(query, key) pairs `attend` scores per batch row and head, without a mask (for FLOP counts)."""
  if not causal:
    return seq * seq
  return sum((end - start) * end for start, end in causal_query_chunks(seq))


ATTENTION_ENV = "STACKWISE_ATTENTION"   # "xla" keeps XLA's attention on a GPU


def attention_implementation(backend: str, dtype, mask) -> str | None:
  """Which `jax.nn.dot_product_attention` implementation `attend` asks for: "cudnn" on a GPU for
  bf16/fp16 inputs without an explicit mask, None (XLA's) elsewhere.

  jax's default is XLA's, which writes the whole [batch, heads, seq, seq] score tensor: on an H200
  it took 8.2 ms of a gpu_1b block's ~16 ms, cuDNN's fused kernel 1.7 ms (BUILD_NOTES *On a GPU*).
  cuDNN takes only half precision, and our masks (decoding) are small. $STACKWISE_ATTENTION=xla
  opts out."""
  if (backend == "gpu" and mask is None and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
      and os.environ.get(ATTENTION_ENV, "").lower() != "xla"):
    return "cudnn"
  return None


class Segments(NamedTuple):
  """Documents packed in each row (data.packing="documents", `packing.document_segments`): a
  token attends only to tokens of its own segment, and RoPE counts from the segment's start."""
  ids: jax.Array         # int32 [batch, seq]
  positions: jax.Array   # int32 [batch, seq]

  @classmethod
  def of(cls, example: dict) -> "Segments | None":
    """An example's segments; None where it has none (concat packing, sampling, export)."""
    return cls(example["segment_ids"], example["positions"]) if "segment_ids" in example else None


_NOTED = set()


def _note_once(message: str) -> None:
  """Prints `message` on stderr the first time in a process (a step prints it while traced)."""
  if message not in _NOTED:
    _NOTED.add(message)
    print(message, file=sys.stderr, flush=True)


def attend(q, k, v, *, causal: bool, mask=None, segment_ids=None) -> jax.Array:
  """Scaled dot-product attention. q: [batch, seq, heads, head_dim]; k, v: [batch, keys,
  kv_heads, head_dim] (GQA: jax.nn.dot_product_attention shares each kv head among a group of
  query heads); mask: broadcastable to [batch, heads, seq, keys], or None; segment_ids: int
  [batch, seq] (self-attention: keys = seq), or None: a query sees only keys of its segment."""
  if segment_ids is not None:
    same = segment_ids[:, None, :, None] == segment_ids[:, None, None, :]   # [batch, 1, seq, keys]
    if attention_implementation(jax.default_backend(), q.dtype, None) == "cudnn":
      _note_once("note: data.packing='documents': attention runs XLA's implementation, not "
                "cuDNN's fused kernel (which takes no segment mask here)")
  chunks = causal_query_chunks(q.shape[1]) if causal and mask is None else []
  if len(chunks) <= 1:
    if segment_ids is not None:
      mask = same if mask is None else mask & same
    implementation = attention_implementation(jax.default_backend(), q.dtype, mask)
    if implementation is not None:
      try:
        return jax.nn.dot_product_attention(q, k, v, is_causal=causal,
                                            implementation=implementation)
      except (NotImplementedError, ValueError, RuntimeError):
        pass   # cuDNN refuses the shapes (head_dim > 128, say) or is missing: XLA's then
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=causal)
  outs = []
  for start, end in chunks:
    # [1, 1, queries, keys]
    visible = (jnp.arange(end)[None, :] <= jnp.arange(start, end)[:, None])[None, None]
    if segment_ids is not None:
      visible = visible & same[:, :, start:end, :end]
    outs.append(jax.nn.dot_product_attention(q[:, start:end], k[:, :end], v[:, :end],
                                             mask=visible))
  return jnp.concatenate(outs, axis=1)


class Attention(nnx.Module):
  """Multi-head or grouped-query self-attention with RoPE."""

  def __init__(self, d_model: int, n_heads: int, n_kv_heads: int, *, rope_theta: float,
               causal: bool, dtype, rngs: nnx.Rngs):
    self.n_heads, self.n_kv_heads = n_heads, n_kv_heads
    self.head_dim = d_model // n_heads
    self.rope_theta, self.causal = rope_theta, causal
    linear = lambda i, o, kernel_axes: Linear(i, o, kernel_axes, dtype=dtype, rngs=rngs)
    self.q = linear(d_model, n_heads * self.head_dim, ("embed", "hidden"))
    self.k = linear(d_model, n_kv_heads * self.head_dim, ("embed", "hidden"))
    self.v = linear(d_model, n_kv_heads * self.head_dim, ("embed", "hidden"))
    self.o = linear(n_heads * self.head_dim, d_model, ("hidden", "embed"))

  def __call__(self, x: jax.Array, cache: dict | None = None, pos=0,
               segments: Segments | None = None):
    """x: [batch, seq, d_model] -> [batch, seq, d_model].

    Decoding (`cache` = {"k", "v"}: [batch, max_len, n_kv_heads, head_dim], see `Rack.init_cache`):
    x holds positions pos .. pos + seq - 1; their keys and values are written into the cache and
    each query attends to every cached position up to its own. Returns (output, updated cache).
    `segments` (no cache): each row holds several documents, attended to and positioned apart.
    """
    b, t, _ = x.shape
    positions = pos + jnp.arange(t) if segments is None else segments.positions   # [(b,) t]
    q = rope(self.q(x).reshape(b, t, self.n_heads, self.head_dim), positions, self.rope_theta)
    k = rope(self.k(x).reshape(b, t, self.n_kv_heads, self.head_dim), positions, self.rope_theta)
    v = self.v(x).reshape(b, t, self.n_kv_heads, self.head_dim)
    mask = None
    if cache is not None:
      cache = {"k": jax.lax.dynamic_update_slice(cache["k"], k.astype(cache["k"].dtype), (0, pos, 0, 0)),
               "v": jax.lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype), (0, pos, 0, 0))}
      k, v = cache["k"].astype(k.dtype), cache["v"].astype(v.dtype)
      mask = (jnp.arange(k.shape[1])[None, :] <= positions[:, None])[None, None]   # [1,1,t,max_len]
    if q.dtype == jnp.float16:
      # fp16 logits overflow easily, and XLA:CPU has no fp16 dot with fp32 accumulation.
      q, k, v = (a.astype(jnp.float32) for a in (q, k, v))
    out = attend(q, k, v, causal=self.causal and cache is None, mask=mask,
                 segment_ids=None if segments is None else segments.ids).astype(x.dtype)
    out = self.o(out.reshape(b, t, self.n_heads * self.head_dim))
    return out if cache is None else (out, cache)


class SwiGLU(nnx.Module):
  """Feed-forward: down(silu(gate(x)) * up(x))."""

  def __init__(self, d_model: int, d_ff: int, *, dtype, rngs: nnx.Rngs):
    linear = lambda i, o, kernel_axes: Linear(i, o, kernel_axes, dtype=dtype, rngs=rngs)
    self.gate = linear(d_model, d_ff, ("embed", "hidden"))
    self.up = linear(d_model, d_ff, ("embed", "hidden"))
    self.down = linear(d_ff, d_model, ("hidden", "embed"))

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.down(jax.nn.silu(self.gate(x)) * self.up(x))


def sinusoidal_embedding(time_step: jax.Array, dim: int, max_period: float = 10_000.0) -> jax.Array:
  """time_step: [batch] ints -> [batch, dim] float32 (dim even)."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = time_step.astype(jnp.float32)[:, None] * freqs[None, :]
  return jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)


class TimeEmbedding(nnx.Module):
  """Diffusion time step -> vector [batch, dim]: fixed sinusoids or a learned table."""

  def __init__(self, num_time_steps: int, dim: int, encoding: str, *, rngs: nnx.Rngs):
    self.dim, self.encoding = dim, encoding
    self.table = (nnx.Embed(num_time_steps, dim, embedding_metadata=axes(None, "time"), rngs=rngs)
                  if encoding == "learned" else None)

  def __call__(self, time_step: jax.Array) -> jax.Array:
    if self.table is not None:
      return self.table(time_step)
    return sinusoidal_embedding(time_step, self.dim)

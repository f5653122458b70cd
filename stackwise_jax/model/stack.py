"""Block and Stack (design §1). A stack is `n_blocks` blocks sharing one precision."""
from flax import nnx
import jax
import jax.numpy as jnp

from stackwise_jax.model.layers import Attention, SwiGLU, dropout
from stackwise_jax.quant import FORMATS
from stackwise_jax.sharding import axes, gathered_call, split_batch

# Compute dtype of each precision. Params stay fp32 while trainable (master weights); a frozen
# stack stores its float params in this dtype (bf16/fp16 stacks drop their fp32 master copy).
# Stored formats (quant/: `qlora` int4 kernels, `nvfp4`) store weights only and compute in theirs.
COMPUTE_DTYPES = {"full": jnp.float32, "bfloat16": jnp.bfloat16, "half": jnp.float16,
                  **{f.precision: f.compute_dtype for f in FORMATS.values()}}


class Block(nnx.Module):
  """Pre-norm block: x + attn(norm(x)); x + ffn(norm(x)).

  With time as input, a per-block projection of the time embedding is added to the residual
  stream before the block (additive conditioning; simpler than adaptive norms and cache-friendly).
  """

  def __init__(self, model_config, *, causal: bool, dtype, time_dim: int | None, rngs: nnx.Rngs):
    m = model_config
    self.dropout_rate = m.dropout
    norm = lambda: nnx.RMSNorm(m.d_model, epsilon=m.norm_eps, dtype=dtype,
                               scale_metadata=axes("norm"), rngs=rngs)
    self.attn_norm = norm()
    self.attn = Attention(m.d_model, m.n_heads, m.n_kv_heads, rope_theta=m.rope_theta,
                          causal=causal, dtype=dtype, rngs=rngs)
    self.ffn_norm = norm()
    self.ffn = SwiGLU(m.d_model, m.d_ff, dtype=dtype, rngs=rngs)
    self.time_proj = (nnx.Linear(time_dim, m.d_model, use_bias=False, dtype=dtype,
                                 kernel_metadata=axes("time", "embed"), rngs=rngs)
                      if time_dim else None)

  def __call__(self, x, time_emb=None, dropout_key=None, segments=None, cache=None, pos=0):
    """x: [batch, seq, d_model]; time_emb: [batch, time_dim] or None; segments: the documents
    of each row (`layers.Segments`) or None. With a KV `cache` (decoding, see `Attention`)
    returns (x, updated cache)."""
    keys = jax.random.split(dropout_key) if dropout_key is not None else (None, None)
    if self.time_proj is not None:
      x = x + self.time_proj(time_emb)[:, None, :].astype(x.dtype)
    attn = self.attn(self.attn_norm(x), cache, pos, segments)
    attn, cache = attn if cache is not None else (attn, None)
    x = x + dropout(attn, self.dropout_rate, keys[0])
    x = x + dropout(self.ffn(self.ffn_norm(x)), self.dropout_rate, keys[1])
    return x if cache is None else (x, cache)


class Stack(nnx.Module):
  """`n_blocks` blocks with one precision. Input and output are fp32 [batch, seq, d_model];
  inside, the residual stream runs in the stack's compute dtype. In a step traced under a
  multi-device mesh (sharding.py) each block runs with its params gathered, on its share of the
  batch."""

  def __init__(self, model_config, *, n_blocks: int, dtype, causal: bool, time_dim: int | None,
               rngs: nnx.Rngs):
    self.dtype = dtype
    self.blocks = nnx.List([
        Block(model_config, causal=causal, dtype=self.dtype, time_dim=time_dim, rngs=rngs)
        for _ in range(n_blocks)])

  def __call__(self, x, time_emb=None, dropout_key=None, caches=None, pos=0, segments=None):
    """With `caches` (one KV cache per block; decoding) returns (x, updated caches). `segments`:
    the documents of each row (`layers.Segments`, batch-shaped like x), or None."""
    keys = (jax.random.split(dropout_key, len(self.blocks)) if dropout_key is not None
            else [None] * len(self.blocks))
    x = x.astype(self.dtype)
    if caches is None:
      segments = jax.tree.map(split_batch, segments)
      for block, key in zip(self.blocks, keys):
        x = gathered_call(block, split_batch(x), time_emb, key, segments)
      return x.astype(jnp.float32)
    updated = []
    for block, cache in zip(self.blocks, caches):
      x, cache = block(x, time_emb, None, None, cache, pos)
      updated.append(cache)
    return x.astype(jnp.float32), updated

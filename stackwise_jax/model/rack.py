"""The rack (design §1): embedding -> stacks in order -> final norm -> LM head.

`Rack` is an immutable snapshot: static structure (stack specs in forward order, NNX graphdefs)
plus a params pytree `{"embed_head": ..., "stacks": {name: ...}}` of plain nested dicts.
Its methods are pure functions of params, so they can be jitted and differentiated; `nnx.merge`
sits at that boundary.
"""
import dataclasses
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp

from stackwise_jax.model.layers import TimeEmbedding

Params = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class StackSpec:
  """What a stack is. `index` is its building order (0 = first stack built)."""
  index: int
  n_blocks: int
  precision: str
  time_step: int | None = None   # time-as-depth step of this stack; None with time as input

  @property
  def name(self) -> str:
    return f"stack_{self.index}"


class EmbedHead(nnx.Module):
  """Token (and time) embedding at the bottom; final norm and LM head at the top."""

  def __init__(self, config, *, rngs: nnx.Rngs):
    m, p = config.model, config.training.progressive
    # Small init: with a tied head, unit-variance rows would give logits of size sqrt(d_model).
    self.embed = nnx.Embed(m.vocab_size, m.d_model, embedding_init=nnx.initializers.normal(0.02),
                           rngs=rngs)
    self.time_embed = (TimeEmbedding(p.num_time_steps, p.time_embedding_dim, p.time_encoding_type,
                                     rngs=rngs)
                       if p.time_interpretation == "input" else None)
    self.final_norm = nnx.RMSNorm(m.d_model, epsilon=m.norm_eps, rngs=rngs)
    self.head = None if m.tie_embeddings else nnx.Linear(m.d_model, m.vocab_size, use_bias=False,
                                                        rngs=rngs)

  def time_embedding(self, time_step):
    """time_step: [batch] ints -> [batch, time_embedding_dim], or None with time as depth."""
    return self.time_embed(time_step) if self.time_embed is not None else None

  def embed_tokens(self, tokens, time_step):
    """tokens: [batch, seq] -> (h [batch, seq, d_model] fp32, time embedding or None)."""
    return self.embed(tokens).astype(jnp.float32), self.time_embedding(time_step)

  def logits(self, h):
    """h: [batch, seq, d_model] -> logits [batch, seq, vocab] fp32."""
    h = self.final_norm(h)
    out = self.embed.attend(h) if self.head is None else self.head(h)
    return out.astype(jnp.float32)


def is_causal(config) -> bool:
  return config.training.progressive.training_objective == "clm"


def time_dim(config) -> int | None:
  p = config.training.progressive
  return p.time_embedding_dim if p.time_interpretation == "input" else None


@dataclasses.dataclass(frozen=True, eq=False)
class Rack:
  """Static structure + params. `specs` are in forward order (embedding side first)."""
  config: Any
  specs: tuple[StackSpec, ...]
  graphdefs: dict[str, Any]        # stack name -> nnx.GraphDef; "embed_head" -> its GraphDef
  params: Params

  @property
  def order(self) -> tuple[str, ...]:
    return tuple(s.name for s in self.specs)

  def embed(self, params: Params, tokens, time_step=None):
    return nnx.merge(self.graphdefs["embed_head"], params["embed_head"]).embed_tokens(tokens, time_step)

  def time_embedding(self, params: Params, time_step):
    return nnx.merge(self.graphdefs["embed_head"], params["embed_head"]).time_embedding(time_step)

  def apply_stacks(self, params: Params, names, h, time_emb=None, dropout_key=None):
    """Runs the named stacks in the given order. h: [batch, seq, d_model] fp32."""
    keys = (jax.random.split(dropout_key, max(len(names), 1)) if dropout_key is not None
            else [None] * len(names))
    for name, key in zip(names, keys):
      h = nnx.merge(self.graphdefs[name], params["stacks"][name])(h, time_emb, key)
    return h

  def logits(self, params: Params, h):
    return nnx.merge(self.graphdefs["embed_head"], params["embed_head"]).logits(h)

  def __call__(self, params: Params, tokens, time_step=None, dropout_key=None):
    """Full forward. tokens: [batch, seq] int32 -> logits [batch, seq, vocab] fp32."""
    h, time_emb = self.embed(params, tokens, time_step)
    return self.logits(params, self.apply_stacks(params, self.order, h, time_emb, dropout_key))


def init_module(module_fn, seed: int, stream: int):
  """Builds an NNX module with rngs from (seed, stream) -> (graphdef, params as plain dicts).

  Each stack uses its own stream, so adding a stack never changes another stack's init.
  """
  module = module_fn(nnx.Rngs(jax.random.fold_in(jax.random.key(seed), stream)))
  graphdef, state = nnx.split(module, nnx.Param)
  return graphdef, nnx.to_pure_dict(state)

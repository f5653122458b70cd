"""The rack (design §1): embedding -> stacks in order -> final norm -> LM head.

`Rack` is an immutable snapshot: static structure (stack specs in forward order, NNX graphdefs)
plus a params pytree `{"embed_head": ..., "stacks": {name: ...}}` of plain nested dicts.
Its methods are pure functions of params, so they can be jitted and differentiated; `nnx.merge`
sits at that boundary.
"""
import dataclasses
import re
from typing import Any

from flax import nnx
from flax import traverse_util
import jax
import jax.numpy as jnp

from stackwise_jax.model.layers import Linear, TimeEmbedding
from stackwise_jax.model.lora import ADAPTED_KERNELS, LoraSetting, apply_qwix, is_adapter_path
from stackwise_jax.model.stack import COMPUTE_DTYPES, Stack
from stackwise_jax.objectives import OBJECTIVES
from stackwise_jax.quant import Format, stack_format
from stackwise_jax.sharding import axes, gathered_call, param_axes
from stackwise_jax.trees import key_path

Params = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class StackSpec:
  """What a stack is. `index` is its building order (0 = first stack built)."""
  index: int
  n_blocks: int
  precision: str
  time_step: int | None = None   # time-as-depth step of this stack; None with time as input
  lora: LoraSetting | None = None               # stack LoRA (qwix), from creation
  progressive_lora: LoraSetting | None = None   # progressive adapter, added once it is trunk
  quantized: bool = False        # attention/FFN kernels stored by qwix (int4), compute in bf16
  packed: bool = False           # nvfp4 kernels stored packed (frozen), not fake-quantized fp32

  @property
  def name(self) -> str:
    return f"stack_{self.index}"

  @property
  def format(self) -> Format | None:
    """The stored format of its attention/FFN kernels (quant.FORMATS); None: float kernels."""
    return stack_format(self.precision, self.quantized)

  @property
  def compute_dtype(self):
    return self.format.compute_dtype if self.format else COMPUTE_DTYPES[self.precision]


class EmbedHead(nnx.Module):
  """Token (and time) embedding at the bottom; final norm and LM head at the top."""

  def __init__(self, config, *, rngs: nnx.Rngs):
    m, p = config.model, config.training.progressive
    # Small init: with a tied head, unit-variance rows would give logits of size sqrt(d_model).
    self.embed = nnx.Embed(m.vocab_size, m.d_model, embedding_init=nnx.initializers.normal(0.02),
                           embedding_metadata=axes("vocab", "embed"), rngs=rngs)
    self.time_embed = (TimeEmbedding(p.num_time_steps, p.time_embedding_dim, p.time_encoding_type,
                                     rngs=rngs)
                       if p.time_interpretation == "input" else None)
    self.final_norm = nnx.RMSNorm(m.d_model, epsilon=m.norm_eps, scale_metadata=axes("norm"),
                                  rngs=rngs)
    self.head = None if m.tie_embeddings else nnx.Linear(m.d_model, m.vocab_size, use_bias=False,
                                                        kernel_metadata=axes("embed", "vocab"),
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
  return OBJECTIVES[config.training.progressive.training_objective].causal


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

  def structure(self) -> tuple:
    """Hashable: equal for racks whose pure functions compute the same thing."""
    return tuple(sorted(self.graphdefs.items(), key=lambda item: item[0]))

  def axes(self) -> dict[str, tuple]:
    """{key path: logical axes} of every params leaf, as its module declared them (the
    graphdefs keep them; sharding.py)."""
    modules = {"embed_head": ("embed_head", self.params["embed_head"]),
               **{f"stacks/{name}": (name, tree) for name, tree in self.params["stacks"].items()}}
    return {f"{prefix}/{path}": names for prefix, (key, tree) in modules.items()
            for path, names in param_axes(nnx.merge(self.graphdefs[key], tree)).items()}

  def _embed_head(self, method: str, params: Params, *args):
    """EmbedHead.`method`(*args), its params gathered under a mesh (sharding.gathered_call)."""
    return gathered_call(nnx.merge(self.graphdefs["embed_head"], params["embed_head"]), *args,
                         method=method)

  def embed(self, params: Params, tokens, time_step=None):
    return self._embed_head("embed_tokens", params, tokens, time_step)

  def time_embedding(self, params: Params, time_step):
    return self._embed_head("time_embedding", params, time_step)

  def apply_stacks(self, params: Params, names, h, time_emb=None, dropout_key=None, active=None,
                   segments=None):
    """Runs the named stacks in the given order. h: [batch, seq, d_model] fp32. `active`: bool
    [batch, len(names)], or None (all run): where False, the example passes that stack unchanged
    (and sends it no gradient). `segments`: the documents of each row (`layers.Segments.of` an
    example, data.packing="documents"), or None: a row is one sequence."""
    keys = (jax.random.split(dropout_key, max(len(names), 1)) if dropout_key is not None
            else [None] * len(names))
    for i, (name, key) in enumerate(zip(names, keys)):
      out = nnx.merge(self.graphdefs[name], params["stacks"][name])(h, time_emb, key,
                                                                   segments=segments)
      h = out if active is None else jnp.where(active[:, i, None, None], out, h)
    return h

  def logits(self, params: Params, h):
    return self._embed_head("logits", params, h)

  def init_cache(self, batch: int, max_len: int) -> dict:
    """An empty KV cache for `decode`: per stack, per block {"k", "v"} zeros
    [batch, max_len, n_kv_heads, head_dim] in the stack's compute dtype."""
    m = self.config.model
    shape = (batch, max_len, m.n_kv_heads, m.d_model // m.n_heads)
    return {s.name: [{"k": jnp.zeros(shape, s.compute_dtype), "v": jnp.zeros(shape, s.compute_dtype)}
                     for _ in range(s.n_blocks)] for s in self.specs}

  def decode(self, params: Params, tokens, cache: dict, pos, time_step=None):
    """Causal forward of `tokens` [batch, seq] at positions pos .. pos + seq - 1, attending to the
    cached positions before them -> (logits [batch, seq, vocab] fp32, updated cache). A prompt
    fills the cache in one call; each further call costs its own positions only."""
    h, time_emb = self.embed(params, tokens, time_step)
    cache = dict(cache)
    for name in self.order:
      h, cache[name] = nnx.merge(self.graphdefs[name], params["stacks"][name])(
          h, time_emb, None, cache[name], pos)
    return self.logits(params, h), cache

  def __call__(self, params: Params, tokens, time_step=None, dropout_key=None, segments=None):
    """Full forward. tokens: [batch, seq] int32 -> logits [batch, seq, vocab] fp32. `segments`:
    see `apply_stacks`."""
    h, time_emb = self.embed(params, tokens, time_step)
    return self.logits(params, self.apply_stacks(params, self.order, h, time_emb, dropout_key,
                                                 segments=segments))


def init_module(module_fn, seed: int, stream: int):
  """Builds an NNX module with rngs from (seed, stream) -> (graphdef, params as plain dicts).

  Each stack uses its own stream, so adding a stack never changes another stack's init.
  """
  module = module_fn(nnx.Rngs(jax.random.fold_in(jax.random.key(seed), stream)))
  graphdef, state = nnx.split(module, nnx.Param)
  return graphdef, nnx.to_pure_dict(state)


# Init streams under a stack's own key: its stack LoRA and its progressive adapters.
_STACK_LORA_STREAM, _PROGRESSIVE_STREAM = 1, 2


def init_stack(config, spec: StackSpec, old_params: Params | None = None):
  """Builds stack `spec` -> (graphdef, params as plain dicts).

  Base weights come from the stack's own stream `index + 1`, adapters from sub-streams of it, so
  neither adapters nor other stacks change them. With `old_params` (the same stack under its
  previous spec) every leaf that still exists is carried over: float kernels feed the stored
  format when `spec.quantized` or `spec.packed` is new, adapters and stored leaves are kept as
  they are.
  """
  key = jax.random.fold_in(jax.random.key(config.training.seed), spec.index + 1)
  module = Stack(config.model, n_blocks=spec.n_blocks, dtype=spec.compute_dtype,
                 causal=is_causal(config), time_dim=time_dim(config), rngs=nnx.Rngs(key))
  if spec.progressive_lora:
    rngs = nnx.Rngs(jax.random.fold_in(key, _PROGRESSIVE_STREAM))
    for layer in _adapted_linears(module):
      layer.add_adapter(spec.progressive_lora.rank, spec.progressive_lora.alpha, rngs)
  _carry_over(module, old_params)
  fmt = spec.format
  if fmt is not None and fmt.quantize is not None:   # the layers quantize their own kernels
    for layer in _adapted_linears(module):
      layer.use_format(fmt, stored=spec.packed)
    _carry_over(module, old_params)   # stored leaves of an already packed stack
  if spec.lora or spec.quantized:
    sample = (jnp.zeros((1, 1, config.model.d_model), jnp.float32),
              jnp.zeros((1, time_dim(config))) if time_dim(config) else None)
    weights = fmt.qwix_rule(fmt.block_size(config.training.progressive)) if spec.quantized else {}
    module = apply_qwix(module, spec.lora, weights, sample,
                        nnx.Rngs(jax.random.fold_in(key, _STACK_LORA_STREAM)))
    _carry_over(module, old_params)   # leaves qwix made: stack LoRA, int4 kernels
  graphdef, state = nnx.split(module, nnx.Param)
  return graphdef, nnx.to_pure_dict(state)


# The kernels through which a block writes to the residual stream: attention and FFN outputs, and
# the time embedding's projection (time as input).
RESIDUAL_WRITES = r"blocks/\d+/(attn/o|ffn/down|time_proj)/.*"


def zero_residual_writes(params: Params) -> Params:
  """A stack's params (plain dicts) with every kernel and bias that writes to the residual stream
  zeroed: the stack then computes the identity (its blocks add nothing), and the first gradients
  reach those kernels (new_stack_init="identity", function-preserving growth)."""
  zero = lambda path, x: (jnp.zeros_like(x) if re.fullmatch(RESIDUAL_WRITES, key_path(path))
                          and not is_adapter_path(path) else x)
  return jax.tree_util.tree_map_with_path(zero, params)


def merged_kernel(spec: StackSpec, layer: Params) -> jax.Array:
  """The kernel [in, out] fp32 that an attention/FFN layer of stack `spec` (its params, plain
  dicts) computes with: its stored format dequantized (a trainable nvfp4 kernel fake-quantized,
  as `Linear` computes with it), its stack LoRA and progressive adapter merged in, so that
  `x @ merged_kernel` is the layer's output up to the stack's compute rounding."""
  flat = traverse_util.flatten_dict(layer, sep="/")
  fmt = spec.format
  if fmt is not None and all(leaf in flat for leaf in fmt.leaves):
    kernel = fmt.dequantize({leaf: flat[leaf] for leaf in fmt.leaves}, jnp.float32)
  elif fmt is not None and fmt.fake_quantize is not None:
    kernel = fmt.fake_quantize(flat["kernel"]).astype(jnp.float32)
  else:
    kernel = jnp.asarray(flat["kernel"], jnp.float32)
  for setting, a, b in ((spec.lora, "kernel_lora_a", "kernel_lora_b"),
                        (spec.progressive_lora, "adapter/lora_a", "adapter/lora_b")):
    if setting is not None:
      kernel = kernel + (jnp.asarray(flat[a], jnp.float32) @ jnp.asarray(flat[b], jnp.float32)
                         ) * setting.scale
  return kernel


def _adapted_linears(module: nnx.Module) -> list[Linear]:
  """The attention/FFN `Linear`s of a stack: the kernels that get adapters or a stored format."""
  return [layer for path, layer in nnx.iter_modules(module)
          if isinstance(layer, Linear) and re.fullmatch(ADAPTED_KERNELS, "/".join(map(str, path)))]


def _carry_over(module: nnx.Module, old_params: Params | None) -> None:
  """Sets every param of `module` that `old_params` has at the same path and shape."""
  if old_params is None:
    return
  state = nnx.state(module, nnx.Param)
  new = traverse_util.flatten_dict(nnx.to_pure_dict(state))
  old = traverse_util.flatten_dict(old_params)
  for path, value in old.items():
    if path in new and new[path].shape == value.shape:
      new[path] = value
  nnx.replace_by_pure_dict(state, traverse_util.unflatten_dict(new))
  nnx.update(module, state)

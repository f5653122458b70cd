"""PyTorch shim for NVFP4 (design §5): the same format as `stackwise_jax.quant.nvfp4`, in torch.

`quantize` packs bit-identically to the JAX reference, eager or jitted (same fp32 operations in
the same order, divisions as multiplications by reciprocals, same round-to-nearest-even), so
encodings move between the two freely. Tensors cross through DLPack
(`to_torch`, `to_jax`) without a copy where the device allows. `export_stack` turns a rack's stack
into a torch module; `Nvfp4Linear` multiplies NVFP4 weights and `to_bitsandbytes` re-quantizes one
for bitsandbytes' 4-bit kernels.
"""
import jax
import jax.numpy as jnp

try:
  import torch
  import torch.nn.functional as F
except ImportError as error:
  raise ImportError(
      "stackwise_jax.backends.torch_nvfp4 needs PyTorch: pip install 'stackwise-jax[torch]' "
      "(CPU-only machines: pip install torch==2.13.0 first)") from error

from stackwise_jax.model.rack import is_causal
from stackwise_jax.quant import nvfp4

_E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)          # magnitude of E2M1 codes 0..7
_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)      # between consecutive magnitudes
_KEYS = ("packed", "scales", "tensor_scale")              # of `quantize`'s dict


# --- DLPack --------------------------------------------------------------------------------------
def to_torch(x: jax.Array) -> torch.Tensor:
  """JAX -> torch through DLPack, sharing the buffer (CPU and GPU): treat it as read-only, JAX
  assumes its arrays never change."""
  return torch.from_dlpack(x)


def to_jax(t: torch.Tensor) -> jax.Array:
  """torch -> JAX through DLPack, sharing the buffer unless XLA needs another alignment.

  float4_e2m1fn_x2 arrives as its uint8 bytes (`quantize`'s "packed"): JAX's DLPack has no
  two-values-per-element dtypes.
  """
  if t.dtype == torch.float4_e2m1fn_x2:
    t = t.view(torch.uint8)
  return jnp.from_dlpack(t.detach())   # torch refuses to export a tensor that requires grad


# --- NVFP4 encoding ------------------------------------------------------------------------------
def _e2m1_codes(values: torch.Tensor) -> torch.Tensor:
  """fp32 values in [-6, 6] -> E2M1 codes (uint8, sign bit 8), rounded to nearest with ties to
  the even code, as ml_dtypes' float4_e2m1fn cast does (torch has no float -> float4 cast on CPU).
  """
  midpoints = torch.tensor(_MIDPOINTS, dtype=torch.float32, device=values.device)
  magnitude = values.abs().contiguous()
  down = torch.bucketize(magnitude, midpoints)               # a tie rounds down
  up = torch.bucketize(magnitude, midpoints, right=True)     # a tie rounds up
  code = torch.where(down % 2 == 0, down, up)   # down != up only at a tie: take the even one
  # signbit, not `< 0`: -0.0 and negatives that round to zero keep the sign, as in ml_dtypes.
  return (code | torch.signbit(values).long() << 3).to(torch.uint8)


def quantize(w: torch.Tensor) -> dict[str, torch.Tensor]:
  """w: [..., K] (K a multiple of 16) -> {"packed": uint8 [..., K/2], "scales": float8_e4m3fn
  [..., K/16], "tensor_scale": float32 []}, bit-identical to `nvfp4.quantize`."""
  if w.shape[-1] % nvfp4.BLOCK:
    raise ValueError(f"nvfp4: the last axis ({w.shape[-1]}) must be a multiple of {nvfp4.BLOCK}")
  # The operations below follow nvfp4.quantize one for one: fp32 rounding then matches bit for bit.
  x = w.detach().to(torch.float32)
  blocks = x.reshape(*x.shape[:-1], x.shape[-1] // nvfp4.BLOCK, nvfp4.BLOCK)
  fp32 = lambda c: torch.tensor(c, dtype=torch.float32, device=x.device)
  amax = x.abs().amax()
  tensor_scale = torch.where(amax > 0, amax * fp32(nvfp4.INV_RANGE), 1.0)
  block_amax = blocks.abs().amax(-1)
  scales = torch.clamp(block_amax * fp32(nvfp4.INV_FP4_MAX) * (1.0 / tensor_scale),
                       max=nvfp4.FP8_MAX).to(torch.float8_e4m3fn)
  step = scales.to(torch.float32)[..., None] * tensor_scale
  inverse_step = torch.where(step > 0, 1.0 / torch.where(step > 0, step, 1.0), 0.0)
  values = blocks * inverse_step
  codes = _e2m1_codes(values.clamp(-nvfp4.FP4_MAX, nvfp4.FP4_MAX))
  codes = codes.reshape(*x.shape[:-1], x.shape[-1] // 2, 2)
  return {"packed": codes[..., 0] | (codes[..., 1] << 4), "scales": scales,
          "tensor_scale": tensor_scale}


def dequantize(q: dict[str, torch.Tensor], dtype=torch.float32) -> torch.Tensor:
  """Inverse of `quantize` up to rounding: -> [..., K] in `dtype`, equal to `nvfp4.dequantize`."""
  packed = q["packed"]
  codes = torch.stack([packed & 0xF, packed >> 4], dim=-1).long()
  magnitude = torch.tensor(_E2M1, dtype=torch.float32, device=packed.device)[codes & 7]
  values = torch.where(codes >= 8, -magnitude, magnitude)
  values = values.reshape(*packed.shape[:-1], packed.shape[-1] * 2 // nvfp4.BLOCK, nvfp4.BLOCK)
  step = q["scales"].to(torch.float32)[..., None] * q["tensor_scale"]
  return (values * step).reshape(*packed.shape[:-1], packed.shape[-1] * 2).to(dtype)


class Nvfp4Linear(torch.nn.Module):
  """y = x @ W.T for a weight W [out, in] held as NVFP4: `q` is `quantize(W)` (the [out, in]
  layout puts the blocks along the contraction axis `in`).

  The weight is dequantized, then multiplied in x's dtype. The encoding is kept as buffers: move
  the module with `.to(device)`, not `.to(dtype)` (that would round the scales).
  """

  def __init__(self, q: dict[str, torch.Tensor]):
    super().__init__()
    self.out_features, self.in_features = q["packed"].shape[0], q["packed"].shape[1] * 2
    for key in _KEYS:
      self.register_buffer(key, q[key])

  def quantized(self) -> dict[str, torch.Tensor]:
    """The encoding, as `quantize` returns it."""
    return {key: getattr(self, key) for key in _KEYS}

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    """x: [..., in] -> [..., out] in x's dtype."""
    return x @ dequantize(self.quantized(), x.dtype).T


def to_bitsandbytes(linear: Nvfp4Linear, compute_dtype=torch.float32) -> torch.nn.Module:
  """-> a `bitsandbytes.nn.Linear4bit` (quant_type="fp4") holding `linear`'s dequantized weight.

  bitsandbytes re-quantizes it into its own 4-bit format, not NVFP4: blocks of 64 consecutive
  values of the flattened [out, in] weight, one absmax scale each (kept fp32: no double
  quantization), codes on its FP4 grid. That second rounding moves each weight by at most
  absmax / 6 (half the grid's widest gap, between 2/3 and 1 of absmax).
  """
  try:
    import bitsandbytes as bnb
  except ImportError as error:
    raise ImportError("to_bitsandbytes needs bitsandbytes: pip install bitsandbytes") from error
  layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=False,
                            compute_dtype=compute_dtype, compress_statistics=False,
                            quant_type="fp4")
  layer.weight = bnb.nn.Params4bit(dequantize(linear.quantized()), requires_grad=False,
                                   compress_statistics=False, quant_type="fp4")
  return layer.to(linear.packed.device)   # bitsandbytes quantizes as the weight moves to a device


# --- Export of a stack ---------------------------------------------------------------------------
class _Dense(torch.nn.Module):
  """y = x @ kernel, kernel [in, out] (the JAX layout)."""

  def __init__(self, kernel: torch.Tensor):
    super().__init__()
    self.register_buffer("kernel", kernel)

  def forward(self, x):
    return x @ self.kernel


class _LoRA(torch.nn.Module):
  """y = (x @ a @ b) · scale; a [in, r], b [r, out]."""

  def __init__(self, a: torch.Tensor, b: torch.Tensor, scale: float):
    super().__init__()
    self.register_buffer("a", a)
    self.register_buffer("b", b)
    self.scale = scale

  def forward(self, x):
    return (x @ self.a @ self.b) * self.scale


class _Projection(torch.nn.Module):
  """An attention/FFN kernel: its base (dense or NVFP4) plus its adapters."""

  def __init__(self, base: torch.nn.Module, adapters: list[_LoRA]):
    super().__init__()
    self.base, self.adapters = base, torch.nn.ModuleList(adapters)

  def forward(self, x):
    y = self.base(x)
    for adapter in self.adapters:
      y = y + adapter(x)
    return y


def _projection(p: dict, spec, dtype) -> _Projection:
  """One attention/FFN kernel's params (see `export_stack`) -> its torch module."""
  tensor = lambda x: to_torch(x).to(dtype)
  if set(nvfp4.LEAVES) <= set(p):
    base = Nvfp4Linear({key: to_torch(x) for key, x in nvfp4.encoding(p).items()})
  elif spec.precision == "nvfp4":   # still training: its forward fake-quantizes the fp32 kernel
    base = Nvfp4Linear(quantize(to_torch(p["kernel"]).T))
  else:
    base = _Dense(tensor(p["kernel"]))
  adapters = []
  if "kernel_lora_a" in p:
    adapters.append(_LoRA(tensor(p["kernel_lora_a"]), tensor(p["kernel_lora_b"]), spec.lora.scale))
  if "adapter" in p:
    adapters.append(_LoRA(tensor(p["adapter"]["lora_a"]), tensor(p["adapter"]["lora_b"]),
                          spec.progressive_lora.scale))
  return _Projection(base, adapters)


def _rms_norm(x: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
  """As flax's RMSNorm: statistics in fp32, x · (rsqrt(mean(x²) + eps) · scale), back to x's
  dtype."""
  x32 = x.to(torch.float32)
  mul = torch.rsqrt(x32.square().mean(-1, keepdim=True) + eps) * scale.to(torch.float32)
  return (x32 * mul).to(x.dtype)


def _rope(x: torch.Tensor, theta: float) -> torch.Tensor:
  """As `layers.rope` at positions 0..seq-1 (in fp32). x: [batch, seq, heads, head_dim]."""
  half = x.shape[-1] // 2
  freqs = theta ** (-torch.arange(half, dtype=torch.float32, device=x.device) / half)
  angles = torch.arange(x.shape[1], dtype=torch.float32, device=x.device)[:, None] * freqs[None]
  sin, cos = angles.sin()[None, :, None, :], angles.cos()[None, :, None, :]
  x1, x2 = x.to(torch.float32).chunk(2, dim=-1)
  return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


class _Block(torch.nn.Module):
  """`stack.Block` without dropout: pre-norm RoPE attention (MHA/GQA) and SwiGLU."""

  def __init__(self, params: dict, spec, model_config, *, causal: bool, dtype):
    super().__init__()
    m = model_config
    self.n_heads, self.n_kv_heads, self.head_dim = m.n_heads, m.n_kv_heads, m.d_model // m.n_heads
    self.eps, self.theta, self.causal = m.norm_eps, m.rope_theta, causal
    self.register_buffer("attn_norm", to_torch(params["attn_norm"]["scale"]).to(dtype))
    self.register_buffer("ffn_norm", to_torch(params["ffn_norm"]["scale"]).to(dtype))
    self.attn = torch.nn.ModuleDict({n: _projection(params["attn"][n], spec, dtype)
                                     for n in ("q", "k", "v", "o")})
    self.ffn = torch.nn.ModuleDict({n: _projection(params["ffn"][n], spec, dtype)
                                    for n in ("gate", "up", "down")})
    self.time_proj = (_Dense(to_torch(params["time_proj"]["kernel"]).to(dtype))
                      if "time_proj" in params else None)

  def attention(self, x):
    """x: [batch, seq, d_model] -> [batch, seq, d_model]."""
    b, t, _ = x.shape
    heads = lambda y, n: y.view(b, t, n, self.head_dim)
    q = _rope(heads(self.attn["q"](x), self.n_heads), self.theta)
    k = _rope(heads(self.attn["k"](x), self.n_kv_heads), self.theta)
    v = heads(self.attn["v"](x), self.n_kv_heads)
    # [batch, heads, seq, head_dim]; enable_gqa maps query head h to kv head h // group, as JAX.
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         is_causal=self.causal, enable_gqa=True)
    return self.attn["o"](out.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim))

  def forward(self, x, time_emb=None):
    if self.time_proj is not None:
      x = x + self.time_proj(time_emb.to(x.dtype))[:, None, :]
    x = x + self.attention(_rms_norm(x, self.attn_norm, self.eps))
    h = _rms_norm(x, self.ffn_norm, self.eps)
    return x + self.ffn["down"](F.silu(self.ffn["gate"](h)) * self.ffn["up"](h))


class TorchStack(torch.nn.Module):
  """A rack's stack in torch (`export_stack`): blocks in order, computing in `dtype`."""

  def __init__(self, blocks: list[_Block], dtype):
    super().__init__()
    self.blocks, self.dtype = torch.nn.ModuleList(blocks), dtype

  def forward(self, x: torch.Tensor, time_emb: torch.Tensor | None = None) -> torch.Tensor:
    """x: [batch, seq, d_model]; time_emb: [batch, time_dim] or None -> [batch, seq, d_model] in
    x's dtype."""
    h = x.to(self.dtype)
    for block in self.blocks:
      h = block(h, time_emb)
    return h.to(x.dtype)


def export_stack(rack, name: str, dtype=torch.float32) -> TorchStack:
  """Stack `name` of a `stackwise_jax.model.Rack` -> a `TorchStack` computing in `dtype`.

  Per block (params `blocks/i`): norms, time projection, and attention/FFN kernels, each a dense
  `kernel` [in, out] or packed NVFP4 (`nvfp4.LEAVES`, an `Nvfp4Linear`; an nvfp4 stack
  still training has fp32 kernels, quantized here as its forward quantizes them), plus the stack
  LoRA (`kernel_lora_a/b`) and the progressive adapter (`adapter/lora_a/b`) where present, each
  adding `(x @ A @ B) · alpha/rank`. Tensors cross through DLPack and share the rack's buffers
  where no cast is needed: treat them as read-only. Raises ValueError for an unknown name or an
  int4 (qwix) stack.
  """
  specs = {spec.name: spec for spec in rack.specs}
  if name not in specs:
    raise ValueError(f"export_stack: no stack {name!r}; the rack has {', '.join(specs)}")
  spec = specs[name]
  if spec.quantized:
    raise ValueError(f"export_stack: {name} has int4 (qwix) kernels; int4/qwix stacks are not "
                     "exportable")
  blocks = rack.params["stacks"][name]["blocks"]
  return TorchStack([_Block(blocks[i], spec, rack.config.model, causal=is_causal(rack.config),
                            dtype=dtype) for i in sorted(blocks)], dtype)

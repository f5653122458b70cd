"""NVFP4 (design §5): E2M1 values in blocks of 16 along the contraction axis, one E4M3 scale per
block, one fp32 scale per tensor, two values packed per byte.

The layout is the one NVIDIA (and torch's float4 packing) uses for a `[..., K]` tensor whose last
axis is contracted: block b holds elements `16b .. 16b+15` of the last axis; byte i holds element
`2i` in its low nibble and `2i+1` in its high nibble. A `[in, out]` kernel is quantized as its
transpose `[out, in]`. Rounding is the dtype casts' round-to-nearest-even (ml_dtypes
float4_e2m1fn / float8_e4m3fn); values saturate at ±6 and block scales at 448.
"""
import jax
import jax.numpy as jnp
import numpy as np

BLOCK = 16
FP4_MAX = 6.0      # largest E2M1 value
FP8_MAX = 448.0    # largest E4M3 value
INV_RANGE = np.float32(1 / (FP4_MAX * FP8_MAX))   # tensor scale = amax × this
INV_FP4_MAX = np.float32(1 / FP4_MAX)
# A packed kernel's params in a frozen nvfp4 stack (`layers.Linear`), named after `quantize`'s
# parts, with their dtypes and dims (the [out, in] layout quantizes along the contraction axis).
LEAVES = {"kernel_packed": ("uint8", ("out", "in")),
          "kernel_scales": ("float8_e4m3fn", ("out", "in")),
          "kernel_tensor_scale": ("float32", ())}


def quantize(x: jax.Array) -> dict[str, jax.Array]:
  """x: [..., K] (K a multiple of 16) -> {"packed": uint8 [..., K/2], "scales": float8_e4m3fn
  [..., K/16], "tensor_scale": float32 []}.

  The tensor scale maps the tensor's absmax to about FP4_MAX × FP8_MAX, so every block scale fits
  E4M3 (block scales are clipped at FP8_MAX in case rounding pushes one over).
  """
  if x.shape[-1] % BLOCK:
    raise ValueError(f"nvfp4: the last axis ({x.shape[-1]}) must be a multiple of {BLOCK}")
  # Divisions are written as multiplications by reciprocals: under jit XLA turns a division by a
  # constant or a broadcast divisor into exactly that, so only this form gives the same bits
  # eagerly, jitted and in torch (backends/torch_nvfp4.py does the same operations).
  x = x.astype(jnp.float32)
  blocks = x.reshape(*x.shape[:-1], x.shape[-1] // BLOCK, BLOCK)
  amax = jnp.max(jnp.abs(x))
  tensor_scale = jnp.where(amax > 0, amax * INV_RANGE, 1.0)
  block_amax = jnp.max(jnp.abs(blocks), axis=-1)
  scales = jnp.minimum(block_amax * INV_FP4_MAX * (1.0 / tensor_scale), FP8_MAX)
  scales = scales.astype(jnp.float8_e4m3fn)
  step = scales.astype(jnp.float32)[..., None] * tensor_scale
  inverse_step = jnp.where(step > 0, 1.0 / jnp.where(step > 0, step, 1.0), 0.0)
  values = blocks * inverse_step
  codes = jax.lax.bitcast_convert_type(
      jnp.clip(values, -FP4_MAX, FP4_MAX).astype(jnp.float4_e2m1fn), jnp.uint4).astype(jnp.uint8)
  codes = codes.reshape(*x.shape[:-1], x.shape[-1] // 2, 2)
  return {"packed": codes[..., 0] | (codes[..., 1] << 4), "scales": scales,
          "tensor_scale": tensor_scale.astype(jnp.float32)}


def dequantize(q: dict[str, jax.Array], dtype=jnp.float32) -> jax.Array:
  """Inverse of `quantize` up to rounding: -> [..., K] in `dtype`."""
  packed = q["packed"]
  codes = jnp.stack([packed & 0xF, packed >> 4], axis=-1).astype(jnp.uint4)
  values = jax.lax.bitcast_convert_type(codes, jnp.float4_e2m1fn).astype(jnp.float32)
  values = values.reshape(*packed.shape[:-1], packed.shape[-1] * 2 // BLOCK, BLOCK)
  step = q["scales"].astype(jnp.float32)[..., None] * q["tensor_scale"]
  return (values * step).reshape(*packed.shape[:-1], packed.shape[-1] * 2).astype(dtype)


@jax.custom_vjp
def fake_quantize(x: jax.Array) -> jax.Array:
  """dequantize(quantize(x)) in x's dtype, with a straight-through gradient (identity)."""
  return dequantize(quantize(x), x.dtype)


fake_quantize.defvjp(lambda x: (fake_quantize(x), None), lambda _, g: (g,))


# A kernel [in, out] as a layer stores and computes with it: transposed, so that blocks run along
# the contraction axis.
def quantize_kernel(kernel: jax.Array) -> dict[str, jax.Array]:
  """kernel [in, out] -> its `LEAVES`."""
  return {"kernel_" + part: value for part, value in quantize(kernel.T).items()}


def encoding(leaves: dict) -> dict:
  """A layer's `LEAVES` -> the encoding as `quantize` returns it."""
  return {leaf.removeprefix("kernel_"): leaves[leaf] for leaf in LEAVES}


def dequantize_kernel(leaves: dict[str, jax.Array], dtype) -> jax.Array:
  """`LEAVES` -> kernel [in, out] in `dtype`."""
  return dequantize(encoding(leaves), dtype).T


def fake_quantize_kernel(kernel: jax.Array) -> jax.Array:
  """kernel [in, out] -> dequantize_kernel(quantize_kernel(kernel)), straight-through gradient."""
  return fake_quantize(kernel.T).T

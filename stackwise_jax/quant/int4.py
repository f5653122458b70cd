"""int4 kernels through qwix (design §5): int4 values in blocks of `quant_block_size` along the
contraction axis, one bf16 scale per block and output, bf16 compute.

qwix does the quantization: `init_stack` gives it `qwix_rule`'s fields (through `model/lora.py`'s
`apply_qwix`, with the stack LoRA's), and qwix replaces the `kernel` param by its `LEAVES` and
intercepts the kernel's `dot_general`.
"""
import jax
import jax.numpy as jnp
import qwix

# Leaves qwix stores for a kernel [in, out], with their dtypes and dims: qwix copies the kernel's
# logical axes onto both (the scale's first dim counts blocks of `in`; sharding.py splits it where
# the mesh axis divides it).
LEAVES = {"kernel/array/qvalue": ("int4", ("in", "out")),
          "kernel/array/scale": ("bfloat16", ("in", "out"))}


def qwix_rule(block: int) -> dict:
  """The fields of a qwix rule that store a kernel in int4, `block` values per scale."""
  return dict(weight_qtype="int4", tile_size=block)


def dequantize_kernel(leaves: dict[str, jax.Array], dtype) -> jax.Array:
  """`LEAVES` -> kernel [in, out] in `dtype` (the int4 values times their block's scale, in fp32)."""
  array = qwix.QArray(qvalue=leaves["kernel/array/qvalue"],
                      scale=leaves["kernel/array/scale"].astype(jnp.float32), qtype=jnp.int4)
  return qwix.dequantize(array).astype(dtype)

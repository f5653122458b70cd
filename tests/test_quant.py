"""The table of stored formats (stackwise_jax/quant) is the single source: every row says what a
frozen stack in that format really holds, checked against stacks built by init_stack and against
references computed here by hand."""
from flax import traverse_util
import jax.numpy as jnp
import numpy as np
import pytest
import qwix

from conftest import micro_config
from stackwise_jax import ProgressiveRackBuilder, validate
from stackwise_jax.errors import ConfigError
from stackwise_jax.model import COMPUTE_DTYPES
from stackwise_jax.quant import FORMATS, nvfp4
from stackwise_jax.trees import leaf_bytes

BLOCK = 16   # quant_block_size of the int4 stacks here
# (layer, [in, out]) of micro_config's attention/FFN kernels (d_model 32, d_ff 64).
KERNELS = {"attn/q": (32, 32), "attn/k": (32, 32), "attn/v": (32, 32), "attn/o": (32, 32),
           "ffn/gate": (32, 64), "ffn/up": (32, 64), "ffn/down": (64, 32)}
# Stored bytes of one [n_in, n_out] kernel, by hand: int4 = half a byte per value + a bf16 scale
# per block of 16 inputs and output; nvfp4 = half a byte per value + an E4M3 scale per 16 values
# + an fp32 tensor scale.
KERNEL_BYTES = {"int4": lambda n_in, n_out: n_in * n_out // 2 + n_in // BLOCK * n_out * 2,
                "nvfp4": lambda n_in, n_out: n_in * n_out // 2 + n_in * n_out // 16 + 4}
# Logical axes of an [in, out] kernel's dims: q/k/v/gate/up read d_model ("embed"), o/down
# write it.
DIMS = {"in": "embed", "out": "hidden"}
DIMS_OUT = {"in": "hidden", "out": "embed"}


def _frozen_stack(fmt):
  """(float params of a stack, the same stack frozen and stored in `fmt`, the logical axes its
  params declare by key path (`Rack.axes`)), built as a run would:
  a float trunk quantized under trunk_strategy="qlora" (int4), or a stack of the format's
  precision frozen after training (nvfp4)."""
  config = micro_config(quant_block_size=BLOCK, progressive_qlora=True, trunk_strategy="qlora")
  builder = ProgressiveRackBuilder(config, default_precision="full" if fmt.qwix_rule else
                                   fmt.precision)
  builder.append_stack(n_blocks=1)
  before = builder.params["stacks"]["stack_0"]
  builder.trained.add("stack_0")
  (builder.freeze_all_but_qlora if fmt.qwix_rule else builder.freeze_trunk)()
  return before, builder.params["stacks"]["stack_0"], builder.build_rack().axes()


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_each_row_says_what_a_frozen_stack_stores(name):
  fmt = FORMATS[name]
  before, after, declared = _frozen_stack(fmt)
  flat = {"/".join(map(str, p)): x for p, x in traverse_util.flatten_dict(after).items()}
  float_kernels = traverse_util.flatten_dict(before)
  for layer, (n_in, n_out) in KERNELS.items():
    prefix = f"blocks/0/{layer}/"
    stored = {p.removeprefix(prefix): x for p, x in flat.items()
              if p.startswith(prefix) and "lora" not in p}
    # Leaves: exactly the row's names and dtypes, and its bytes.
    assert {leaf: x.dtype.name for leaf, x in stored.items()} == {
        leaf: dtype for leaf, (dtype, _) in fmt.leaves.items()}, layer
    assert sum(leaf_bytes(x) for x in stored.values()) == KERNEL_BYTES[name](n_in, n_out)
    # Sharding: the axes the leaves declare are the row's "in"/"out" dims, the kernel's.
    dims = DIMS_OUT if layer in ("attn/o", "ffn/down") else DIMS
    for leaf, (_, axes) in fmt.leaves.items():
      got = declared[f"stacks/stack_0/{prefix}{leaf}"]
      assert got == tuple(dims.get(a) for a in axes), leaf
    # Values: the stored leaves are the format's encoding of the float kernel, computed here
    # independently, and the row's dequantize gives the kernel back within its rounding.
    kernel = np.asarray(float_kernels[("blocks", 0) + tuple(layer.split("/")) + ("kernel",)])
    if name == "int4":
      q = qwix.quantize(jnp.asarray(kernel, jnp.bfloat16), jnp.int4, channelwise_axes=(1,),
                        tiled_axes={0: BLOCK}, scale_dtype=jnp.bfloat16)
      want = {"kernel/array/qvalue": q.qvalue, "kernel/array/scale": q.scale}
    else:
      want = {f"kernel_{key}": x for key, x in nvfp4.quantize(kernel.T).items()}
    for leaf, x in want.items():
      np.testing.assert_array_equal(np.asarray(stored[leaf], np.float32),
                                    np.asarray(x, np.float32), err_msg=leaf)
    error = np.asarray(fmt.dequantize(stored, jnp.float32)) - kernel
    assert 0 < np.sqrt(np.mean(error**2) / np.mean(kernel**2)) < 0.2, layer


def test_precisions_and_config_checks_come_from_the_table():
  for fmt in FORMATS.values():
    assert COMPUTE_DTYPES[fmt.precision] == fmt.compute_dtype
    validate(micro_config(new_stack_precision=fmt.precision, quant_block_size=BLOCK))
  with pytest.raises(ConfigError, match=r"new_stack_precision='int8'.*'qlora', 'nvfp4'"):
    validate(micro_config(new_stack_precision="int8"))

"""NVFP4 in JAX (design §5): hand-worked encodings, and nvfp4 stacks (fake-quantized while they
train, packed once frozen)."""
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import micro_config
from stackwise_jax import ConfigError, ProgressiveRackBuilder, ProgressiveTrainer, validate
from stackwise_jax.data import make_dataloader
from stackwise_jax.quant import nvfp4
from stackwise_jax.progressive import TRAINABLE
from stackwise_jax.trees import tree_bytes

# E2M1 codes (sign bit 8): 0, 0.5, 1, 1.5, 2, 3, 4, 6 -> 0..7.
TENSOR_AMAX = 6 * 448.0   # a block holding this makes the tensor scale exactly 1


def _codes(packed: np.ndarray) -> list[int]:
  """Unpacks bytes by hand: low nibble first."""
  return [c for byte in packed.tolist() for c in (byte & 0xF, byte >> 4)]


def _with_anchor(block: list[float]) -> jnp.ndarray:
  """[anchor block, block]: the anchor fixes the tensor scale at 1.0, so block scales are exact."""
  return jnp.asarray([TENSOR_AMAX] + [0.0] * 15 + block, jnp.float32)


def test_known_values_ties_and_packing():
  #            value -> code:  6->7, 0.25 tie(0, 0.5)->0, 0.75 tie(0.5, 1)->1.0=2, 1.25 tie->1.0=2,
  #  1.75 tie(1.5, 2)->2=4, 2.5 tie(2, 3)->2=4, 3.5 tie(3, 4)->4=6, 5 tie(4, 6)->4=6, -3->-3=8|5,
  #  -0.5->8|1, 1.5->3, 0->0, 4->6, -6->8|7, 0.1->0, -0.3->-0.5=9
  block = [6, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5, -3, -0.5, 1.5, 0, 4, -6, 0.1, -0.3]
  q = nvfp4.quantize(_with_anchor(block))
  assert float(q["tensor_scale"]) == 1.0
  assert q["scales"].astype(jnp.float32).tolist() == [448.0, 1.0]    # block amax 6 -> scale 1
  codes = _codes(np.asarray(q["packed"]))
  assert codes[16:] == [7, 0, 2, 2, 4, 4, 6, 6, 13, 9, 3, 0, 6, 15, 0, 9]
  assert np.asarray(q["packed"])[8] == 7 | (0 << 4) and np.asarray(q["packed"])[9] == 2 | (2 << 4)
  decoded = nvfp4.dequantize(q)[16:].tolist()
  assert decoded == [6, 0, 1, 1, 2, 2, 4, 4, -3, -0.5, 1.5, 0, 4, -6, 0, -0.5]


def test_subnormal_block_scale():
  # Block amax 6 * 2^-9: scale 2^-9 is an E4M3 subnormal (smallest normal 2^-6), held exactly.
  s = 2.0 ** -9
  block = [6 * s, 3 * s, -1 * s, 0.5 * s] + [0.0] * 12
  q = nvfp4.quantize(_with_anchor(block))
  assert float(q["scales"].astype(jnp.float32)[1]) == s
  assert _codes(np.asarray(q["packed"]))[16:20] == [7, 5, 10, 1]
  np.testing.assert_array_equal(nvfp4.dequantize(q)[16:], np.asarray(block, np.float32))


def test_values_saturate_when_the_block_scale_rounds_down():
  # Block amax 6 * 1.0625: 1.0625 ties between E4M3 1.0 and 1.125 -> 1.0 (even); 6.375 / 1.0
  # saturates to 6 (code 7) instead of overflowing.
  block = [6 * 1.0625, -6 * 1.0625] + [0.0] * 14
  q = nvfp4.quantize(_with_anchor(block))
  assert float(q["scales"].astype(jnp.float32)[1]) == 1.0
  assert _codes(np.asarray(q["packed"]))[16:18] == [7, 15]
  assert nvfp4.dequantize(q)[16:18].tolist() == [6.0, -6.0]


def test_all_zero_blocks_and_tensors():
  q = nvfp4.quantize(jnp.zeros((3, 32)))
  assert not np.any(np.asarray(q["packed"])) and not np.any(q["scales"].astype(jnp.float32))
  np.testing.assert_array_equal(nvfp4.dequantize(q), np.zeros((3, 32)))
  q = nvfp4.quantize(_with_anchor([0.0] * 16))
  assert np.all(np.isfinite(nvfp4.dequantize(q))) and not np.any(nvfp4.dequantize(q)[16:])


def test_round_trip_error_within_the_format_bound():
  """Per element: half the E2M1 gap at |x|/s (0.5 below 2, 1 below 4, 2 above), times the block's
  step s, plus whatever saturation at 6·s cut off."""
  x = jax.random.normal(jax.random.key(0), (8, 64)) * jnp.exp(jax.random.normal(jax.random.key(1), (8, 1)))
  q = nvfp4.quantize(x)
  err = np.abs(np.asarray(nvfp4.dequantize(q) - x))
  step = np.repeat(np.asarray(q["scales"].astype(jnp.float32)), 16, axis=-1) * float(q["tensor_scale"])
  v = np.abs(np.asarray(x)) / step
  gap = np.where(v < 2, 0.5, np.where(v < 4, 1.0, 2.0))
  bound = gap / 2 * step + np.maximum(v - 6, 0) * step
  assert np.all(err <= bound * (1 + 1e-6) + 1e-12)
  assert np.max(v) <= 6 * (1 + 2 ** -4)   # E4M3 rounding of a scale moves it by at most 2^-4
  # Half a byte per value, one per block scale, four for the tensor scale.
  assert tree_bytes(q) == 8 * 64 // 2 + 8 * 64 // 16 + 4


def test_shape_must_be_whole_blocks():
  with pytest.raises(ValueError, match="multiple of 16"):
    nvfp4.quantize(jnp.ones((4, 24)))


def test_straight_through_gradient_equals_the_unquantized_gradient():
  w = jax.random.normal(jax.random.key(2), (4, 32))
  x = jax.random.normal(jax.random.key(3), (5, 32))
  loss = lambda w, f: jnp.sum(jnp.tanh(x @ f(w).T))
  g_fake = jax.grad(lambda w: loss(w, nvfp4.fake_quantize))(w)
  # Straight-through: d/dw of f(w) is the identity, so the gradient is the upstream gradient
  # evaluated at the quantized weights.
  wq = nvfp4.dequantize(nvfp4.quantize(w))
  g_identity_at_wq = jax.grad(lambda v: loss(v, lambda u: u))(wq)
  np.testing.assert_allclose(g_fake, g_identity_at_wq, rtol=1e-6, atol=1e-6)
  assert not np.allclose(wq, w)   # the forward really quantized
  # With a loss linear in the kernel the upstream gradient does not depend on w: the STE gradient
  # then equals the unquantized gradient exactly.
  c = jax.random.normal(jax.random.key(4), (5, 4))
  linear = lambda w, f: jnp.sum((x @ f(w).T) * c)
  np.testing.assert_allclose(jax.grad(lambda w: linear(w, nvfp4.fake_quantize))(w),
                             jax.grad(lambda w: linear(w, lambda u: u))(w), rtol=1e-6)


# --- nvfp4 stacks. ---

KERNELS = ("attn/q", "attn/k", "attn/v", "attn/o", "ffn/gate", "ffn/up", "ffn/down")


def _flat(tree):
  return {"/".join(map(str, path)): x for path, x in traverse_util.flatten_dict(tree).items()}


def _stack_output(builder, name, h):
  rack = builder.build_rack()
  return rack.apply_stacks(rack.params, [name], h)


def _nvfp4_round_trip(params):
  """The stack's params with every attention/FFN kernel [in, out] replaced by
  dequantize(quantize(kernel^T))^T: what an nvfp4 stack should compute with."""
  flat = traverse_util.flatten_dict(params)
  for path, w in flat.items():
    if path[-1] == "kernel" and "/".join(map(str, path[-3:-1])) in KERNELS:
      flat[path] = nvfp4.dequantize(nvfp4.quantize(w.T)).T
  return traverse_util.unflatten_dict(flat)


def test_nvfp4_stack_computes_with_round_tripped_kernels_and_packs_when_frozen():
  config = micro_config()
  h = jax.random.normal(jax.random.key(1), (2, 16, 32))
  builder = ProgressiveRackBuilder(config)
  builder.append_stack(precision="nvfp4")
  fake = _stack_output(builder, "stack_0", h)
  # Independent reference: a bf16 stack (the same compute dtype) holding the round-tripped kernels.
  reference = ProgressiveRackBuilder(config)
  reference.append_stack(precision="bfloat16")
  reference.params["stacks"]["stack_0"] = _nvfp4_round_trip(builder.params["stacks"]["stack_0"])
  expected = _stack_output(reference, "stack_0", h)
  np.testing.assert_allclose(fake, expected, rtol=1e-5, atol=1e-5)
  # ... and differs from the unquantized bf16 stack: the kernels really were quantized.
  reference.params["stacks"]["stack_0"] = builder.params["stacks"]["stack_0"]
  assert float(jnp.max(jnp.abs(_stack_output(reference, "stack_0", h) - fake))) > 1e-2

  builder.trained.add("stack_0")
  builder.freeze_trunk()
  assert builder.specs[0].packed
  stored = _flat(builder.params["stacks"]["stack_0"])
  for kernel in KERNELS:
    path = f"blocks/0/{kernel}"
    assert f"{path}/kernel" not in stored
    assert stored[f"{path}/kernel_packed"].dtype == jnp.uint8
    assert stored[f"{path}/kernel_scales"].dtype == jnp.float8_e4m3fn
    assert stored[f"{path}/kernel_tensor_scale"].dtype == jnp.float32
  np.testing.assert_allclose(_stack_output(builder, "stack_0", h), fake, rtol=1e-6, atol=1e-6)


def test_frozen_nvfp4_stack_takes_at_most_030_of_bf16_bytes_and_reports_it():
  from stackwise_jax.progressive.trainer import stack_memory
  config = micro_config()
  config.model.d_model, config.model.n_heads, config.model.n_kv_heads, config.model.d_ff = (
      128, 4, 4, 384)
  sizes = {}
  for precision in ("bfloat16", "nvfp4"):
    builder = ProgressiveRackBuilder(config, default_precision=precision)
    builder.append_stack()
    builder.trained.add("stack_0")
    builder.freeze_trunk()
    base = builder.params["stacks"]["stack_0"]
    sizes[precision] = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(base))
    reported = stack_memory(builder.specs, builder.params, {})["stack_0"]
    assert reported["base_bytes"] == sizes[precision]
  kernel_values = 4 * 128 * 128 + 3 * 128 * 384
  norms = 2 * 128 * 2                               # two bf16 RMSNorm scales
  # Half a byte per value + one E4M3 scale per 16 values + 4 bytes per tensor scale.
  assert sizes["nvfp4"] == kernel_values // 2 + kernel_values // 16 + 7 * 4 + norms
  assert sizes["nvfp4"] <= 0.30 * sizes["bfloat16"], sizes


def test_nvfp4_trunk_under_qlora_packs_and_trains_only_its_adapters():
  config = micro_config(progressive_qlora=True, trunk_strategy="qlora",
                        new_stack_precision="nvfp4")
  builder = ProgressiveRackBuilder(config)
  builder.append_stack(), builder.append_stack()
  builder.trained.add("stack_0")
  builder.freeze_all_but_qlora()
  assert builder.specs[0].packed and not builder.specs[0].quantized   # nvfp4, not int4
  labels = _flat(builder.labels()["stacks"]["stack_0"])
  trainable = {p for p, label in labels.items() if label == TRAINABLE}
  assert trainable == {p for p in labels if "/adapter/" in p}
  assert len(trainable) == 2 * len(KERNELS)


def test_nvfp4_config_errors_name_the_field():
  with pytest.raises(ConfigError, match="qlora_enabled"):
    validate(micro_config(new_stack_precision="nvfp4", qlora_enabled=True))
  config = micro_config(new_stack_precision="nvfp4")
  config.model.d_ff = 72
  with pytest.raises(ConfigError, match=r"model\.d_ff.*multiple of 16"):
    validate(config)
  builder = ProgressiveRackBuilder(micro_config(qlora_enabled=True))
  with pytest.raises(ValueError, match="qlora_enabled"):
    builder.append_stack(precision="nvfp4")


def test_two_stage_run_with_nvfp4_trunk_lowers_the_loss(text_corpus):
  config = micro_config(new_stack_precision="nvfp4", target_stacks=2)
  config.data.source, config.data.paths = "text", (text_corpus,)
  config.training.steps_per_stack, config.training.eval_every = 30, 30
  config.training.lr = 3e-3
  builder = ProgressiveRackBuilder(config)
  results = ProgressiveTrainer(config, progress=False, log=lambda _: None).train_progressively(
      builder, make_dataloader(config))
  first, second = results["stages"]
  assert builder.specs[0].packed and not builder.specs[1].packed
  assert second["memory"]["stack_0"]["packed"]
  assert second["activation_mode"] == "cached"
  for stage in (first, second):
    assert stage["loss_end"] < stage["loss_start"], stage
  assert second["eval_loss"] < first["eval_loss"], (first["eval_loss"], second["eval_loss"])

"""The PyTorch shim (backends/torch_nvfp4.py) against the JAX reference: bit-identical NVFP4
packing, DLPack without copies, stacks exported to torch, bitsandbytes, and life without torch."""
import dataclasses
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from conftest import REPO, micro_config  # noqa: E402
from stackwise_jax import ProgressiveRackBuilder  # noqa: E402
from stackwise_jax.backends import torch_nvfp4 as tn  # noqa: E402
from stackwise_jax.quant import nvfp4  # noqa: E402

TORCH_DTYPES = {jnp.float32: torch.float32, jnp.bfloat16: torch.bfloat16, jnp.uint8: torch.uint8,
                jnp.float8_e4m3fn: torch.float8_e4m3fn}
UINTS = {1: np.uint8, 2: np.uint16, 4: np.uint32}


def _bits(x) -> np.ndarray:
  """The raw bits of a JAX array or torch tensor, as unsigned ints of the same width."""
  if isinstance(x, torch.Tensor):
    x = x.view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[x.dtype.itemsize]).numpy()
  x = np.asarray(x)
  return x.view(UINTS[x.dtype.itemsize])


def _random_bits(seed, shape, dtype) -> jax.Array:
  """Every bit pattern of `dtype` is possible (NaNs, infinities, -0.0, subnormals)."""
  uint = UINTS[jnp.dtype(dtype).itemsize]
  bits = np.random.default_rng(seed).integers(0, np.iinfo(uint).max, shape, uint, endpoint=True)
  return jnp.asarray(bits.view(dtype))


# --- Bit-identical packing. ---

def _ties(rng) -> np.ndarray:
  """An anchor block fixing the tensor scale at 1, then blocks of exact E2M1 ties (0.25, 0.75, ...,
  5), -0.0 and values rounding to ±0, at block scales 1, 0.5 and 2^-9 (an E4M3 subnormal), so that
  every value divided by its step is exactly the tie."""
  ties = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0]
  block = [6.0] + ties + [-t for t in ties] + [-0.0]
  small = [-6.0, -0.1, 0.1, -0.0, 0.0, -0.2, 0.2, -0.25] + [-0.0] * 8
  rows = [[6 * 448.0] + [0.0] * 15]
  rows += [[s * v for v in b] for s in (1.0, 0.5, 2.0**-9) for b in (block, small)]
  return np.tile(np.asarray(rows + [[0.0] * 16], np.float32).reshape(1, 128), (16, 1))


def _inexact_ties(rng) -> np.ndarray:
  """The same ties at a step (about 0.3) that is no power of two: values land on or next to ties
  depending on the last bit of each fp32 operation, which therefore has to match exactly."""
  ties = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0]
  block = np.asarray([6.0] + ties + [-t for t in ties] + [0.0], np.float32)
  return 0.3 * np.tile(block, (16, 8)) * np.linspace(1, 2, 16, dtype=np.float32)[:, None]


def _zero_blocks(rng) -> np.ndarray:
  """Whole zero rows and zero blocks (one of them all -0.0) among normal values."""
  x = rng.standard_normal((16, 8, 16))
  x[0], x[:, ::3], x[2, 1] = 0.0, 0.0, -0.0
  return x.reshape(16, 128)


CASES = {  # name: rng -> a [..., 128] tensor
    "normal": lambda rng: rng.standard_normal((16, 128)),
    "student_t": lambda rng: rng.standard_t(1.5, (16, 128)),
    "cauchy": lambda rng: rng.standard_cauchy((16, 128)),
    "zero_blocks": _zero_blocks,
    "ties": _ties,
    "inexact_ties": _inexact_ties,
    # Block scales 10^-12 to 10^4 apart: zero (flushed) and subnormal E4M3 scales.
    "dynamic_range": lambda rng: (rng.standard_normal((16, 8, 16))
                                  * 10.0 ** rng.uniform(-12, 4, (16, 8, 1))).reshape(16, 128),
    "all_zero": lambda rng: np.zeros((16, 128)),
    "bfloat16_3d": lambda rng: rng.standard_normal((2, 8, 128)).astype(jnp.bfloat16),
}


@pytest.mark.parametrize("case", CASES)
def test_torch_packing_is_bit_identical_to_jax(case):
  """Against `nvfp4.quantize` run op by op (as the builder packs kernels) and jitted (as the
  fake quantization of a training stack runs): XLA may rewrite divisions under jit, which the JAX
  code avoids, so all three must agree."""
  x = CASES[case](np.random.default_rng(0))
  x = jnp.asarray(x, x.dtype if x.dtype == jnp.bfloat16 else jnp.float32)
  got = tn.quantize(tn.to_torch(x))
  assert got["packed"].dtype == torch.uint8 and got["scales"].dtype == torch.float8_e4m3fn
  assert got["tensor_scale"].dtype == torch.float32 and got["tensor_scale"].shape == ()
  for want in (nvfp4.quantize(x), jax.jit(nvfp4.quantize)(x)):
    for key in ("packed", "scales", "tensor_scale"):
      assert tuple(got[key].shape) == want[key].shape, key
      np.testing.assert_array_equal(_bits(got[key]), _bits(want[key]), err_msg=key)
  # Decoding too, bit for bit (-0.0 included), in fp32 and bf16.
  for jax_dtype, torch_dtype in ((jnp.float32, torch.float32), (jnp.bfloat16, torch.bfloat16)):
    np.testing.assert_array_equal(_bits(tn.dequantize(got, torch_dtype)),
                                  _bits(nvfp4.dequantize(want, jax_dtype)))


def test_ties_round_to_the_even_code():
  """By hand, independent of ml_dtypes: 0.25->0, 0.75->1, 1.25->1, 1.75->2, 2.5->2, 3.5->4, 5->4
  (codes 0, 2, 2, 4, 4, 6, 6); -0.0 and -0.1 keep their sign (code 8); -5 -> -4 (code 14)."""
  x = torch.tensor([6 * 448.0] + [0.0] * 15
                   + [6, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5, -0.0, -0.1, 0.1, -5, 0, 0, 0, 0])
  packed = tn.quantize(x)["packed"][8:].tolist()
  codes = [c for byte in packed for c in (byte & 0xF, byte >> 4)]
  assert codes == [7, 0, 2, 2, 4, 4, 6, 6, 8, 8, 0, 14, 0, 0, 0, 0]


def test_dequantize_matches_jax_for_every_byte_and_scale():
  """Decoding alone, on encodings quantize never makes: every byte, random finite E4M3 scales."""
  packed = jnp.asarray(np.arange(128 * 16).astype(np.uint8).reshape(128, 16))
  scales = _random_bits(1, (128, 2), jnp.float8_e4m3fn)
  scales = jnp.where(jnp.isnan(scales), jnp.float8_e4m3fn(1.5), scales)
  q = {"packed": packed, "scales": scales, "tensor_scale": jnp.float32(0.37)}
  got = tn.dequantize({key: tn.to_torch(v) for key, v in q.items()})
  np.testing.assert_array_equal(_bits(got), _bits(nvfp4.dequantize(q, jnp.float32)))


# --- DLPack. ---

@pytest.mark.parametrize("dtype", TORCH_DTYPES)
def test_jax_to_torch_shares_the_buffer_and_round_trips_exactly(dtype):
  x = _random_bits(2, (8, 64), dtype)
  t = tn.to_torch(x)
  assert t.dtype == TORCH_DTYPES[dtype] and tuple(t.shape) == x.shape
  assert t.data_ptr() == x.unsafe_buffer_pointer()      # no copy
  np.testing.assert_array_equal(_bits(t), _bits(x))
  back = tn.to_jax(t)
  assert back.dtype == x.dtype
  np.testing.assert_array_equal(_bits(back), _bits(x))


@pytest.mark.parametrize("dtype", TORCH_DTYPES)
def test_torch_to_jax_shares_the_buffer_and_round_trips_exactly(dtype):
  t = tn.to_torch(_random_bits(3, (8, 64), dtype)).clone()   # memory torch allocated
  x = tn.to_jax(t)
  assert x.dtype == dtype and x.unsafe_buffer_pointer() == t.data_ptr()
  np.testing.assert_array_equal(_bits(tn.to_torch(x)), _bits(t))


def test_to_jax_takes_tensors_that_require_grad():
  t = torch.arange(4.0, requires_grad=True)
  np.testing.assert_array_equal(tn.to_jax(t), [0.0, 1.0, 2.0, 3.0])


def test_torch_float4_tensors_cross_to_jax_as_their_packed_bytes():
  packed = tn.quantize(torch.randn(4, 32))["packed"]
  f4 = packed.view(torch.float4_e2m1fn_x2)    # torch's own packing: element 2i in bits 0-3
  np.testing.assert_array_equal(tn.to_jax(f4), packed.numpy())   # in JAX as uint8


# --- Nvfp4Linear and bitsandbytes. ---

def _nvfp4_linear():
  """(kernel [in=128, out=16] in JAX, its JAX encoding, an Nvfp4Linear built from it). The
  encoding has the packing tests' shape: their compiled ops serve again."""
  kernel = jnp.asarray(0.1 * np.random.default_rng(4).standard_normal((128, 16)), jnp.float32)
  q = nvfp4.quantize(kernel.T)
  return kernel, q, tn.Nvfp4Linear({key: tn.to_torch(v) for key, v in q.items()})


def test_nvfp4_linear_matches_a_jax_dequantized_matmul():
  kernel, q, linear = _nvfp4_linear()
  assert (linear.in_features, linear.out_features) == (128, 16)
  x = jnp.asarray(np.random.default_rng(5).standard_normal((2, 5, 128)), jnp.float32)
  got = linear(tn.to_torch(x))
  want = x @ nvfp4.dequantize(q, jnp.float32).T
  assert got.dtype == torch.float32 and tuple(got.shape) == (2, 5, 16)
  # fp32, same weights: only the summation order of 128 products differs.
  scale = float(jnp.max(jnp.abs(want)))
  np.testing.assert_allclose(got.numpy(), want, atol=1e-5 * scale, rtol=0)
  assert float(jnp.max(jnp.abs(want - x @ kernel))) > 1e-2 * scale    # really quantized
  # bf16 input: the weight is dequantized to bf16 and the output is bf16 (one rounding: 2^-8).
  xb = x.astype(jnp.bfloat16)
  got = linear(tn.to_torch(xb))
  want = (xb @ nvfp4.dequantize(q, jnp.bfloat16).T).astype(jnp.float32)
  assert got.dtype == torch.bfloat16
  np.testing.assert_allclose(got.float().numpy(), want, atol=2**-7 * scale, rtol=0)
  # Built from torch's own encoding of the torch kernel: the same module.
  twin = tn.Nvfp4Linear(tn.quantize(tn.to_torch(kernel).T))
  assert torch.equal(twin(tn.to_torch(x)), linear(tn.to_torch(x)))


def test_bitsandbytes_layer_stays_within_its_fp4_rounding():
  """bitsandbytes re-quantizes the dequantized weight W in blocks of 64 (flattened [out, in]) on
  its FP4 grid {0, 0.0052, 1/6, 1/4, 1/3, 1/2, 2/3, 1} × the block's absmax, whose widest gap is
  1/3: each weight moves by at most absmax/6. So |y_bnb - y| <= |x| @ (absmax/6).T, per output."""
  bnb = pytest.importorskip("bitsandbytes")
  _, q, linear = _nvfp4_linear()
  layer = tn.to_bitsandbytes(linear)
  assert isinstance(layer, bnb.nn.Linear4bit) and layer.weight.quant_type == "fp4"
  assert layer.weight.quant_state.blocksize == 64
  x = torch.randn(2, 5, 128, generator=torch.Generator().manual_seed(6))
  y, y_bnb = linear(x), layer(x)
  assert y_bnb.dtype == torch.float32 and y_bnb.shape == y.shape
  w = np.asarray(nvfp4.dequantize(q, jnp.float32))                         # [16, 128]
  absmax = np.repeat(np.abs(w.reshape(-1, 64)).max(-1), 64).reshape(w.shape)
  bound = np.abs(x.numpy()) @ (absmax / 6).T
  err = np.abs((y_bnb - y).numpy())
  assert np.all(err <= bound * (1 + 1e-5) + 1e-6)
  assert err.max() > 1e-3 * np.abs(y.numpy()).max()    # bitsandbytes really rounded


def test_to_bitsandbytes_without_bitsandbytes_says_what_to_install(monkeypatch):
  monkeypatch.setitem(sys.modules, "bitsandbytes", None)   # `import bitsandbytes` raises
  with pytest.raises(ImportError, match=r"needs bitsandbytes: pip install bitsandbytes"):
    tn.to_bitsandbytes(_nvfp4_linear()[2])


# --- Export of stacks. ---

def _builder(n_heads, n_kv_heads, precision=None, **progressive):
  """A builder of 2-block stacks: stack_0 (`precision`) and stack_1 (full), so stack_0 is trunk."""
  config = micro_config(**progressive)
  config.model.n_blocks_per_stack = 2
  config.model.attention = "mha" if n_kv_heads == n_heads else "gqa"
  config.model.n_heads, config.model.n_kv_heads = n_heads, n_kv_heads
  builder = ProgressiveRackBuilder(config)
  builder.add_stack(precision=precision), builder.add_stack()
  return builder


def _randomize_lora_b(params):
  """Every stack-LoRA and progressive B gets random values, so that the adapters matter."""
  rng = np.random.default_rng(7)
  return jax.tree_util.tree_map_with_path(
      lambda p, x: (jnp.asarray(0.1 * rng.standard_normal(x.shape), x.dtype)
                    if str(p[-1].key) in ("kernel_lora_b", "lora_b") else x), params)


def _inputs(rack):
  """Random h [2, 12, d_model] and, with time as input, a random time embedding [2, time_dim]."""
  rng, p = np.random.default_rng(8), rack.config.training.progressive
  h = jnp.asarray(rng.standard_normal((2, 12, rack.config.model.d_model)), jnp.float32)
  time_emb = (jnp.asarray(rng.standard_normal((2, p.time_embedding_dim)), jnp.float32)
              if p.time_interpretation == "input" else None)
  return h, time_emb


def _torch_forward(rack, name, dtype=torch.float32) -> np.ndarray:
  """The exported stack on `_inputs`, as fp32 numpy."""
  h, time_emb = _inputs(rack)
  got = tn.export_stack(rack, name, dtype)(tn.to_torch(h), None if time_emb is None
                                          else tn.to_torch(time_emb))
  assert got.dtype == torch.float32 and tuple(got.shape) == h.shape
  return got.numpy()


def _jax_forward(rack, name) -> tuple[jax.Array, float]:
  """(rack.apply_stacks on `_inputs`, its max |value|). Jitted: one compile, not one per op."""
  h, time_emb = _inputs(rack)
  want = jax.jit(lambda params: rack.apply_stacks(params, [name], h, time_emb))(rack.params)
  return want, float(jnp.max(jnp.abs(want)))


def test_exported_stacks_match_the_jax_forward():
  """Causal, GQA (4 query heads on 2 kv heads, so the head mapping matters), time as input,
  stack LoRA on both stacks, progressive adapters on stack_0.

  fp32 on both sides, same weights: the differences are summation order and libm (sin, pow, exp)
  at ~5e-7 of the activations' scale; 1e-5 of it leaves a 20× margin."""
  builder = _builder(4, 2, training_objective="clm", qlora_enabled=True, qlora_rank=4,
                     progressive_qlora=True, time_interpretation="input")
  plain = builder.build_rack()
  builder.params = _randomize_lora_b(builder.params)
  rack = builder.build_rack()
  for name in rack.order:
    q = rack.params["stacks"][name]["blocks"][1]["attn"]["q"]
    progressive = {"adapter"} if name == "stack_0" else set()
    assert set(q) == {"kernel", "kernel_lora_a", "kernel_lora_b"} | progressive
    assert len(tn.export_stack(rack, name).blocks) == 2
    got, (want, scale) = _torch_forward(rack, name), _jax_forward(rack, name)
    np.testing.assert_allclose(got, want, atol=1e-5 * scale, rtol=0, err_msg=name)
    # The adapters move the output far beyond that tolerance.
    assert np.max(np.abs(_torch_forward(plain, name) - got)) > 1e-2 * scale


def test_nvfp4_trunk_and_dense_mlm_stack_export():
  """Bidirectional MHA rack: stack_0 nvfp4 with progressive adapters, stack_1 dense without
  adapters (fp32, tolerance as above).

  While stack_0 trains, its forward fake-quantizes fp32 kernels; the export quantizes them the
  same way, and once packed, the export reads the packed leaves: the same encoding either way
  (checked bit for bit), so the same torch output. An nvfp4 stack computes in bf16: exported in
  bf16, only where each side rounds to bf16 differs, at 2^-8 of a value per rounding; ~1% of the
  activations' scale is seen after 2 blocks, 3% is allowed. Dense kernels instead of NVFP4 would
  move the output by ~13%."""
  builder = _builder(2, 2, "nvfp4", training_objective="mlm", progressive_qlora=True)
  builder.params = _randomize_lora_b(builder.params)
  outputs = []
  for packed in (False, True):
    if packed:
      builder.trained.add("stack_0")
      builder.freeze_trunk()
    rack = builder.build_rack()
    params = rack.params["stacks"]["stack_0"]["blocks"][0]["attn"]["q"]
    assert set(params) == {"adapter"} | (set(nvfp4.LEAVES) if packed else {"kernel"})
    q = tn.export_stack(rack, "stack_0", torch.bfloat16).blocks[0].attn["q"].base.quantized()
    want = ({key: params[f"kernel_{key}"] for key in ("packed", "scales", "tensor_scale")}
            if packed else nvfp4.quantize(params["kernel"].T))
    for key in q:
      np.testing.assert_array_equal(_bits(q[key]), _bits(want[key]), err_msg=key)
    outputs.append(_torch_forward(rack, "stack_0", torch.bfloat16))
  # The exported module shares the rack's packed bytes.
  assert q["packed"].data_ptr() == params["kernel_packed"].unsafe_buffer_pointer()
  np.testing.assert_array_equal(outputs[0], outputs[1])
  want, scale = _jax_forward(rack, "stack_0")
  np.testing.assert_allclose(outputs[1], want, atol=0.03 * scale, rtol=0)
  got, (want, scale) = _torch_forward(rack, "stack_1"), _jax_forward(rack, "stack_1")
  np.testing.assert_allclose(got, want, atol=1e-5 * scale, rtol=0)


def test_int4_stacks_and_unknown_names_are_refused():
  """The refusal reads the stack's spec, so a spec saying int4 is enough here (building a real
  qwix int4 stack takes ~10 s; tests/test_lora.py covers those)."""
  builder = ProgressiveRackBuilder(micro_config())
  spec = builder.add_stack()
  rack = builder.build_rack()
  int4 = dataclasses.replace(rack, specs=(dataclasses.replace(spec, precision="qlora",
                                                               quantized=True),))
  with pytest.raises(ValueError, match=r"stack_0 .*int4/qwix stacks are not exportable"):
    tn.export_stack(int4, "stack_0")
  with pytest.raises(ValueError, match=r"no stack 'stack_9'; the rack has stack_0"):
    tn.export_stack(rack, "stack_9")


# --- Without torch. ---

_WITHOUT_TORCH = """
import sys
sys.modules["torch"] = None                    # `import torch` now raises ImportError
sys.path.insert(0, {tests!r})
import jax
import jax.numpy as jnp
import stackwise_jax
from conftest import micro_config
builder = stackwise_jax.ProgressiveRackBuilder(micro_config())
builder.add_stack()
rack = builder.build_rack()
logits = jax.jit(rack)(rack.params, jnp.zeros((1, 8), jnp.int32))
assert logits.shape == (1, 8, builder.config.model.vocab_size)
try:
  import stackwise_jax.backends.torch_nvfp4
except ImportError as error:
  print("ImportError:", error)
"""


def test_the_package_works_without_torch_and_the_shim_says_how_to_install_it():
  result = subprocess.run([sys.executable, "-c", _WITHOUT_TORCH.format(tests=str(REPO / "tests"))],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
  assert result.returncode == 0, result.stderr
  assert "ImportError:" in result.stdout and "pip install 'stackwise-jax[torch]'" in result.stdout
  assert "torch==2.13.0" in result.stdout

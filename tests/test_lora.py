"""Dual LoRA and the int4 (QLoRA) trunk: design §4–§6 and §8."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from conftest import micro_config, reference_logits
from stackwise_jax import ConfigError, ProgressiveRackBuilder, ProgressiveTrainer, validate
from stackwise_jax.data import make_dataloader
from stackwise_jax.progressive import TRAINABLE

KERNELS = ("q", "k", "v", "o", "gate", "up", "down")


def _flat(tree):
  return traverse_util.flatten_dict(jax.device_get(tree))


def _text(config, pattern):
  config.data.source, config.data.paths = "text", (pattern,)
  return config


def _stack_output(builder, name, h):
  rack = builder.build_rack()
  return rack.apply_stacks(rack.params, [name], h)


# --- Rank and alpha per stack (design §6). ---

_TABLE = [  # (strategy, rank pattern, alpha pattern, [(rank, alpha) of stacks 0..3])
    ("simplified", "increasing", "increasing", [(8, 16), (8, 16), (8, 16), (8, 16)]),
    ("progressive", "constant", "constant", [(8, 16), (8, 16), (8, 16), (8, 16)]),
    ("progressive", "increasing", "increasing", [(8, 16), (16, 32), (32, 64), (64, 128)]),
    ("progressive", "decreasing", "decreasing", [(8, 16), (4, 8), (2, 4), (1, 2)]),
    ("progressive", "linear", "linear", [(8, 16), (16, 32), (24, 48), (32, 64)]),
    ("progressive", "increasing", "constant", [(8, 16), (16, 16), (32, 16), (64, 16)]),
    ("progressive", "decreasing", "linear", [(8, 16), (4, 32), (2, 48), (1, 64)]),
]


@pytest.mark.parametrize("strategy, rank_pattern, alpha_pattern, expected", _TABLE)
def test_rank_and_alpha_per_stack_follow_strategy_and_pattern(strategy, rank_pattern,
                                                              alpha_pattern, expected):
  config = micro_config(qlora_enabled=True, qlora_rank=8, qlora_alpha=16.0,
                        qlora_strategy=strategy, qlora_rank_pattern=rank_pattern,
                        qlora_alpha_pattern=alpha_pattern, target_stacks=4)
  builder = ProgressiveRackBuilder(config)
  specs = [builder.append_stack() for _ in range(4)]
  assert [(s.lora.rank, s.lora.alpha) for s in specs] == expected
  for spec, (rank, _) in zip(specs, expected):   # the adapters really have that rank
    q = builder.params["stacks"][spec.name]["blocks"][0]["attn"]["q"]
    assert q["kernel_lora_a"].shape == (32, rank) and q["kernel_lora_b"].shape == (rank, 32)


def test_variable_strategy_reads_qlora_configs_and_names_a_missing_index():
  table = {0: {"rank": 2, "alpha": 3.0}, 1: {"rank": 6, "alpha": 1.5}}
  config = micro_config(qlora_enabled=True, qlora_strategy="variable", qlora_configs=table,
                        target_stacks=2)
  builder = ProgressiveRackBuilder(config)
  specs = [builder.append_stack() for _ in range(2)]
  assert [(s.lora.rank, s.lora.alpha) for s in specs] == [(2, 3.0), (6, 1.5)]
  with pytest.raises(ValueError, match=r"qlora_configs: no entry for stack 2"):
    builder.append_stack()
  config.training.progressive.target_stacks = 3   # caught before anything is built
  with pytest.raises(ConfigError, match=r"training\.progressive\.qlora_configs=.*every stack"):
    validate(config)


# --- Adapters start as a no-op (B = 0). ---


def test_stack_lora_leaves_the_rack_output_unchanged():
  tokens = jax.random.randint(jax.random.key(0), (2, 12), 0, 256)
  logits = []
  for enabled in (False, True):
    builder = ProgressiveRackBuilder(micro_config(qlora_enabled=enabled))
    builder.append_stack(), builder.append_stack()
    rack = builder.build_rack()
    logits.append(rack(rack.params, tokens))
  assert "kernel_lora_a" in str(_flat(rack.params).keys())
  np.testing.assert_array_equal(logits[0], logits[1])


@pytest.mark.parametrize("precision", ["full", "qlora"])
def test_progressive_adapters_leave_the_trunk_output_unchanged(precision):
  config = micro_config(progressive_qlora=True, quant_block_size=16)
  builder = ProgressiveRackBuilder(config, default_precision=precision)
  builder.append_stack()
  h = jax.random.normal(jax.random.key(1), (2, 12, 32))
  before = _stack_output(builder, "stack_0", h)
  builder.append_stack()                       # stack_0 becomes trunk and gets its adapters
  assert builder.specs[0].progressive_lora is not None
  assert any("adapter" in map(str, path) for path in _flat(builder.params["stacks"]["stack_0"]))
  np.testing.assert_array_equal(before, _stack_output(builder, "stack_0", h))


def test_quant_block_size_that_does_not_divide_the_kernels_is_refused():
  builder = ProgressiveRackBuilder(micro_config(quant_block_size=24))
  with pytest.raises(ValueError, match=r"quant_block_size=24: .*divisor of model.d_model \(32\)"):
    builder.append_stack(precision="qlora")


# --- The int4 trunk's forward. ---


def _dequantized(builder):
  """Params with every int4 kernel dequantized by hand (value × its block's scale) and both
  adapters merged into it: W + (alpha/r)·A·B + (alpha'/r')·A'·B'."""
  flat, out = _flat(builder.params), {}
  specs = {s.name: s for s in builder.specs}
  for path, x in flat.items():
    if path[-1] in ("qvalue", "kernel"):
      layer = path[:path.index("kernel")]
      if path[-1] == "qvalue":
        q = np.asarray(x, np.float32)
        scale = np.asarray(flat[layer + ("kernel", "array", "scale")], np.float32)
        w = q * np.repeat(scale, q.shape[0] // scale.shape[0], axis=0)
      else:
        w = np.asarray(x, np.float32)
      spec = specs.get(path[1])
      if layer + ("kernel_lora_a",) in flat:
        w = w + spec.lora.scale * flat[layer + ("kernel_lora_a",)] @ flat[layer + ("kernel_lora_b",)]
      if layer + ("adapter", "lora_a") in flat:
        w = w + (spec.progressive_lora.scale
                 * flat[layer + ("adapter", "lora_a")] @ flat[layer + ("adapter", "lora_b")])
      out[layer + ("kernel",)] = w
    elif "kernel" not in path and "adapter" not in path and not str(path[-1]).startswith("kernel_"):
      out[path] = np.asarray(x, np.float32)
  return traverse_util.unflatten_dict(out)


def test_int4_trunk_with_both_adapters_matches_a_hand_dequantized_reference():
  config = micro_config(qlora_enabled=True, qlora_rank=4, progressive_qlora=True,
                        quant_block_size=16, trunk_strategy="qlora")
  builder = ProgressiveRackBuilder(config)
  builder.append_stack(), builder.append_stack()
  builder.trained.add("stack_0")
  builder.freeze_all_but_qlora()
  assert builder.specs[0].quantized and not builder.specs[1].quantized
  assert _flat(builder.params["stacks"]["stack_0"])[
      ("blocks", 0, "ffn", "down", "kernel", "array", "qvalue")].dtype == jnp.int4
  # Give every adapter a non-zero B so that the check covers them.
  key = iter(jax.random.split(jax.random.key(2), 1000))
  builder.params = jax.tree_util.tree_map_with_path(
      lambda p, x: (0.05 * jax.random.normal(next(key), x.shape)
                    if str(p[-1].key) in ("kernel_lora_b", "lora_b") else x), builder.params)
  # A unit-scale embedding makes logits O(10), so that a missing adapter term (O(10)) would show.
  embedding = builder.params["embed_head"]["embed"]["embedding"]
  builder.params["embed_head"]["embed"]["embedding"] = jax.random.normal(jax.random.key(9),
                                                                         embedding.shape)
  rack = builder.build_rack()
  tokens = jax.random.randint(jax.random.key(3), (2, 12), 0, 256)
  got = rack(rack.params, tokens)
  want = reference_logits(_dequantized(builder), config, rack.order, tokens, causal=True)
  # The int4 stack computes in bf16: the tolerance is bf16 rounding (int4 itself is exact here).
  scale = float(jnp.max(jnp.abs(want)))
  assert scale > 5
  np.testing.assert_allclose(got, want, atol=0.02 * scale, rtol=0)


def test_int4_forward_tracks_full_precision():
  """Stated tolerances (relative RMS error, int4 blocks of 32 vs fp32): each kernel < 10% (uniform
  rounding of a Gaussian block of 32 gives ~9%); the stack's residual update < 25% (the kernel
  errors compound through SwiGLU's product and attention)."""
  config = micro_config(qlora_enabled=True, quant_block_size=32)
  config.model.d_model, config.model.n_heads, config.model.n_kv_heads, config.model.d_ff = (
      128, 4, 4, 384)
  rel = lambda approx, exact: float(jnp.sqrt(jnp.mean((approx - exact) ** 2) / jnp.mean(exact ** 2)))
  builder = ProgressiveRackBuilder(config)
  builder.append_stack()
  h = jax.random.normal(jax.random.key(4), (2, 16, 128))
  full = _stack_output(builder, "stack_0", h)
  kernels = {p: np.asarray(x) for p, x in _flat(builder.params).items() if p[-1] == "kernel"}
  builder.trained.add("stack_0")
  builder.freeze_all_but_qlora()
  int4 = _stack_output(builder, "stack_0", h)
  dequantized = _flat(_dequantized(builder))
  kernel_errors = [rel(dequantized[p], w) for p, w in kernels.items() if "time_proj" not in p]
  assert len(kernel_errors) == len(KERNELS)
  assert 0.01 < max(kernel_errors) < 0.10, kernel_errors   # > 0.01: really quantized
  assert rel(int4 - h, full - h) < 0.25


def test_frozen_int4_stack_takes_at_most_030_of_bf16_bytes():
  config = micro_config(qlora_enabled=False, progressive_qlora=True)
  config.model.d_model, config.model.n_heads, config.model.n_kv_heads, config.model.d_ff = (
      128, 4, 4, 384)
  sizes = {}
  for how in ("bf16", "int4"):
    builder = ProgressiveRackBuilder(config, default_precision="bfloat16")
    builder.append_stack()
    builder.trained.add("stack_0")
    (builder.freeze_trunk if how == "bf16" else builder.freeze_all_but_qlora)()
    base = {p: x for p, x in _flat(builder.params["stacks"]["stack_0"]).items()
            if "adapter" not in p}
    # Bytes counted here from dtypes alone: int4 = 4 bits, the rest by their width.
    sizes[how] = sum(x.size * (4 if x.dtype == jnp.int4 else 8 * x.dtype.itemsize) // 8
                     for x in base.values())
    if how == "bf16":
      assert all(x.dtype == jnp.bfloat16 for x in base.values())
    else:
      assert sum(x.size for x in base.values() if x.dtype == jnp.int4) == 4 * 128 * 128 + 3 * 128 * 384
  assert sizes["int4"] <= 0.30 * sizes["bf16"], sizes


# --- Labels (design §4). ---


def _trainable_paths(builder, name):
  labels = _flat(builder.labels()["stacks"][name])
  return {p for p, label in labels.items() if label == TRAINABLE}


def test_freeze_trunk_freezes_adapters_and_freeze_all_but_qlora_frees_exactly_them():
  config = micro_config(qlora_enabled=True, progressive_qlora=True, quant_block_size=16)
  builder = ProgressiveRackBuilder(config)
  builder.append_stack(), builder.append_stack()
  builder.trained.add("stack_0")
  adapters = {p for p in _flat(builder.params["stacks"]["stack_0"])
              if re.search(r"lora", str(p[-1]))}
  assert len(adapters) == 2 * 2 * len(KERNELS)   # A and B, stack and progressive, per kernel
  assert _trainable_paths(builder, "stack_0") == set(_flat(builder.params["stacks"]["stack_0"]))
  builder.freeze_trunk()
  assert _trainable_paths(builder, "stack_0") == set()
  builder.freeze_all_but_qlora()
  assert _trainable_paths(builder, "stack_0") == adapters
  assert _trainable_paths(builder, "stack_1") == set(_flat(builder.params["stacks"]["stack_1"]))


# --- A stage with a qlora or a frozen trunk. ---


def _train_second_stage(config):
  """Trains stack_0, adds stack_1 and labels the trunk; returns (params before, after stage 2)."""
  builder = ProgressiveRackBuilder(config)
  loader = make_dataloader(config)
  trainer = ProgressiveTrainer(config, progress=False, log=lambda msg: None)
  trainer.train_progressively(builder, loader, target_stacks=1)
  builder.append_stack()
  if config.training.progressive.trunk_strategy == "qlora":
    builder.freeze_all_but_qlora()
  else:
    builder.freeze_trunk()
  before = _flat(builder.params["stacks"])
  trainer.train_progressively(builder, loader, target_stacks=2)
  return builder, before, _flat(builder.params["stacks"])


def test_qlora_trunk_stage_trains_adapters_and_new_stack_never_the_int4_base(text_corpus):
  config = _text(micro_config(trunk_strategy="qlora", qlora_enabled=True, progressive_qlora=True,
                              quant_block_size=16), text_corpus)
  builder, before, after = _train_second_stage(config)
  assert builder.specs[0].quantized
  trunk = {p for p in before if p[0] == "stack_0"}
  adapters = {p for p in trunk if "lora" in str(p[-1])}
  int4 = {p for p in trunk if before[p].dtype == jnp.int4}
  assert len(int4) == len(KERNELS) and adapters
  for p in trunk - adapters:
    np.testing.assert_array_equal(before[p], after[p], err_msg=str(p))
  b_factors = [p for p in adapters if "lora_b" in p[-1]]
  assert b_factors
  for p in b_factors:   # B starts at zero and must have moved
    assert not np.array_equal(before[p], after[p]), p
  new = [p for p in before if p[0] == "stack_1"]
  assert all(not np.array_equal(before[p], after[p]) for p in new if before[p].ndim == 2)


def test_frozen_trunk_stage_changes_no_trunk_leaf_including_adapters(text_corpus):
  config = _text(micro_config(trunk_strategy="frozen", qlora_enabled=True, progressive_qlora=True,
                              quant_block_size=16), text_corpus)
  builder, before, after = _train_second_stage(config)
  trunk = [p for p in before if p[0] == "stack_0"]
  assert any("adapter" in p for p in trunk)
  for p in trunk:
    np.testing.assert_array_equal(before[p], after[p], err_msg=str(p))


def test_qlora_run_streams_says_so_once_and_reports_memory(text_corpus):
  config = _text(micro_config(trunk_strategy="qlora", progressive_qlora=True,
                              quant_block_size=16), text_corpus)
  messages = []
  trainer = ProgressiveTrainer(config, progress=False, log=messages.append)
  results = trainer.train_progressively(ProgressiveRackBuilder(config), make_dataloader(config))
  assert sum("streamed" in m for m in messages) == 1
  last = results["stages"][-1]
  assert [s["activation_mode"] for s in results["stages"][1:]] == ["streamed", "streamed"]
  mem = last["memory"]
  assert set(mem) == {"stack_0", "stack_1", "stack_2"}
  for name in ("stack_0", "stack_1"):     # int4 trunk with adapters that train
    assert mem[name]["quantized"] and mem[name]["adapter_bytes"] > 0
    assert mem[name]["base_bytes"] < 0.5 * mem["stack_2"]["base_bytes"]
    # Adam keeps mu and nu (fp32) for exactly the adapters.
    assert mem[name]["optimizer_bytes"] == 2 * mem[name]["adapter_bytes"]
  assert mem["stack_2"]["optimizer_bytes"] == 2 * (mem["stack_2"]["base_bytes"]
                                                   + mem["stack_2"]["adapter_bytes"])
  assert last["lora_params"] == sum(m["adapter_bytes"] for m in mem.values()) // 4
  assert results["stages"][-1]["eval_loss"] < results["stages"][0]["eval_loss"]

"""The rack's forward pass against an independent plain-JAX implementation, and attention masks."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import micro_config, reference_logits
from stackwise_jax.model import layers
from stackwise_jax.model.layers import attend, attention_scores, causal_query_chunks
from stackwise_jax.progressive import ProgressiveRackBuilder





@pytest.mark.parametrize("objective,attention,n_kv", [("clm", "mha", 2), ("mlm", "mha", 2),
                                                      ("clm", "gqa", 1)])
def test_rack_forward_matches_plain_jax_reference(objective, attention, n_kv):
  config = micro_config(training_objective=objective)
  config.model.attention, config.model.n_kv_heads = attention, n_kv
  config.model.n_blocks_per_stack = 2
  builder = ProgressiveRackBuilder(config)
  for _ in range(2):
    builder.add_stack()
  rack = builder.build_rack()
  tokens = jax.random.randint(jax.random.key(1), (2, 12), 0, config.model.vocab_size)
  got = rack(rack.params, tokens)
  want = reference_logits(rack.params, config, rack.order, tokens, causal=objective == "clm")
  np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("objective,future_visible", [("clm", False), ("mlm", True)])
def test_attention_is_causal_only_for_clm(objective, future_visible):
  builder = ProgressiveRackBuilder(micro_config(training_objective=objective))
  builder.add_stack()
  rack = builder.build_rack()
  tokens = jnp.arange(10, dtype=jnp.int32)[None]
  changed = tokens.at[0, -1].set(99)       # change only the last token
  delta = jnp.abs(rack(rack.params, tokens) - rack(rack.params, changed))[0, :-1]
  assert bool(jnp.any(delta > 1e-6)) == future_visible


@pytest.mark.parametrize("precision,dtype,tol", [("bfloat16", jnp.bfloat16, 0.1),
                                                 ("half", jnp.float16, 0.02)])
def test_low_precision_stack_computes_in_its_dtype_and_tracks_fp32(precision, dtype, tol):
  config = micro_config()
  full = ProgressiveRackBuilder(config, default_precision="full")
  low = ProgressiveRackBuilder(config, default_precision=precision)
  full.add_stack(), low.add_stack()
  tokens = jnp.arange(16, dtype=jnp.int32)[None]
  rf, rl = full.build_rack(), low.build_rack()
  # Same seed, same init: only the compute dtype differs.
  jax.tree.map(np.testing.assert_array_equal, rf.params, rl.params)
  hlo = jax.jit(lambda p: rl(p, tokens)).lower(rl.params).as_text()
  assert {jnp.bfloat16: "bf16", jnp.float16: "f16"}[dtype] in hlo
  np.testing.assert_allclose(rl(rl.params, tokens), rf(rf.params, tokens), atol=tol, rtol=tol)


@pytest.mark.parametrize("seq", [31, 64, 100])
def test_chunked_causal_attention_matches_plain_attention_and_its_gradients(seq):
  """`attend` splits causal queries into chunks on CPU (skipping hidden keys; 100 = 3 uneven
  chunks); values and gradients must be those of one full causal attention, GQA included."""
  q, k, v = (jax.random.normal(jax.random.key(i), (2, seq, heads, 8))
             for i, heads in enumerate((4, 2, 2)))
  expected = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True)
  got = lambda q, k, v: attend(q, k, v, causal=True)
  np.testing.assert_allclose(jax.jit(got)(q, k, v), expected(q, k, v), rtol=1e-5, atol=1e-5)
  loss = lambda f: jax.jit(jax.grad(lambda *a: jnp.sum(jnp.sin(f(*a))), argnums=(0, 1, 2)))(q, k, v)
  for g, e in zip(loss(got), loss(expected)):
    np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-5)


def test_cudnn_attention_is_asked_for_on_a_gpu_in_half_precision_only(monkeypatch):
  pick = layers.attention_implementation
  assert pick("gpu", jnp.bfloat16, None) == "cudnn" and pick("gpu", jnp.float16, None) == "cudnn"
  assert pick("gpu", jnp.float32, None) is None            # cuDNN takes half precision only
  assert pick("gpu", jnp.bfloat16, jnp.ones((1, 1, 4, 4), bool)) is None   # decoding's mask
  assert pick("cpu", jnp.bfloat16, None) is None and pick("tpu", jnp.bfloat16, None) is None
  monkeypatch.setenv(layers.ATTENTION_ENV, "xla")
  assert pick("gpu", jnp.bfloat16, None) is None


def test_attention_falls_back_to_xla_where_cudnn_is_refused(monkeypatch):
  """Asked for cuDNN where there is none (this CPU), `attend` computes XLA's attention."""
  monkeypatch.setattr(layers, "attention_implementation", lambda *_: "cudnn")
  q, k, v = (jax.random.normal(jax.random.key(i), (2, 16, heads, 8), jnp.bfloat16)
             for i, heads in enumerate((4, 2, 2)))
  expected = jax.nn.dot_product_attention(q, k, v, is_causal=True)
  np.testing.assert_array_equal(jax.jit(lambda *a: attend(*a, causal=True))(q, k, v), expected)


def test_chunked_causal_attention_scores_about_half_the_pairs():
  chunks = causal_query_chunks(256)
  assert len(chunks) == 8 and chunks[0][0] == 0 and chunks[-1][1] == 256
  assert all(a[1] == b[0] for a, b in zip(chunks, chunks[1:]))      # every query exactly once
  causal_pairs = 256 * 257 // 2
  assert causal_pairs <= attention_scores(256, causal=True) < 0.6 * 256**2
  assert attention_scores(256, causal=False) == 256**2
  assert causal_query_chunks(31) == [(0, 31)]

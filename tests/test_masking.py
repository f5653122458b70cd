"""Specification tests for objectives.py and progressive/masking.py (design §7): the objective
table, time mappings, masks and training examples."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from stackwise_jax import objectives
from stackwise_jax.config import default_config, validate
from stackwise_jax.model.rack import is_causal
from stackwise_jax.progressive import masking

MASK, PAD = 257, 256


def make_config(**progressive):
  c = default_config()
  for k, v in progressive.items():
    setattr(c.training.progressive, k, v)
  return c


def token_batch(batch_size=4, seq_len=16, first_id=0, seed=0):
  rng = np.random.default_rng(seed)
  return {"tokens": jnp.asarray(rng.integers(0, 256, (batch_size, seq_len)), jnp.int32),
          "example_id": jnp.arange(first_id, first_id + batch_size, dtype=jnp.int32)}


# --- The objective table ---------------------------------------------------------------------------

def test_objective_rows_match_the_design():
  """Design §7 and §12, written out by hand: clm is causal and generates left to right; mlm is
  bidirectional, masks at the time step's ratio and samples by unmasking; custom takes targets."""
  rows = {name: (o.causal, o.masks, o.sampling, o.needs) for name, o in objectives.OBJECTIVES.items()}
  assert rows == {"mlm": (False, True, "unmask", ()), "clm": (True, False, "generate", ()),
                  "custom": (False, False, None, ("targets",))}
  for name, row in objectives.OBJECTIVES.items():
    config = validate(make_config(training_objective=name))   # every row is a config choice
    assert is_causal(config) == row.causal
    assert (masking.TimeStepMasking(config).mask_ratio_for_stack(0) > 0) == row.masks


# --- Time as depth --------------------------------------------------------------------------------

@masking.register_time_mapping("test_quadratic")
def quadratic(stack_idx, max_stacks, num_time_steps):
  del max_stacks, num_time_steps
  return stack_idx * stack_idx + 1


# Rows: (mapping, time_per_stack, num_time_steps, time step per *level* 0..5). Written by hand.
DEPTH_TABLE = [
    ("linear", 4, 16, [0, 4, 8, 12, 15, 15]),         # 16 and 20 clip to N-1 = 15
    ("linear", 3, 100, [0, 3, 6, 9, 12, 15]),
    ("exponential", 2, 16, [0, 2, 6, 14, 15, 15]),    # 2 * (2**L - 1) = 0, 2, 6, 14, 30, 62
    ("exponential", 1, 100, [0, 1, 3, 7, 15, 31]),
    ("custom", 0, 16, [1, 2, 5, 10, 15, 15]),         # L**2 + 1 = 1, 2, 5, 10, 17, 26
]


@pytest.mark.parametrize("mapping,tps,n,by_level", DEPTH_TABLE)
@pytest.mark.parametrize("mode", ["prepend", "append"])
def test_time_step_for_stack_matches_table(mapping, tps, n, by_level, mode):
  target = len(by_level)
  config = make_config(stack_time_mapping=mapping, time_per_stack=tps, num_time_steps=n,
                       building_mode=mode, max_stacks=target, target_stacks=target,
                       custom_time_mapping="test_quadratic" if mapping == "custom" else "")
  masker = masking.TimeStepMasking(config)
  # prepend: the k-th stack built is level k; append: level target-1-k (first built nearest the embedding).
  expected = by_level if mode == "prepend" else by_level[::-1]
  assert [masker.get_time_step_for_stack(k) for k in range(target)] == expected


def test_both_modes_put_highest_noise_nearest_embedding():
  for mode in ("append", "prepend"):
    masker = masking.TimeStepMasking(make_config(building_mode=mode, target_stacks=3))
    steps = {masker.level_of_stack(k): masker.get_time_step_for_stack(k) for k in range(3)}
    assert steps == {0: 0, 1: 4, 2: 8}, mode


def test_append_stacks_beyond_target_sit_at_level_zero():
  masker = masking.TimeStepMasking(make_config(building_mode="append", max_stacks=4, target_stacks=2))
  assert [masker.level_of_stack(k) for k in range(4)] == [1, 0, 0, 0]
  with pytest.raises(ValueError, match="stack_idx=-1"):
    masker.level_of_stack(-1)


def test_unknown_custom_mapping_raises_with_field_path():
  config = make_config(stack_time_mapping="custom", custom_time_mapping="no_such_mapping")
  with pytest.raises(ValueError, match=r"training\.progressive\.custom_time_mapping='no_such_mapping'"
                     r".*test_quadratic"):
    masking.TimeStepMasking(config)


def test_custom_mapping_receives_level_max_stacks_and_num_steps():
  calls = []

  @masking.register_time_mapping("test_recorder")
  def recorder(stack_idx, max_stacks, num_time_steps):
    calls.append((stack_idx, max_stacks, num_time_steps))
    return 0

  assert recorder.__name__ == "recorder"   # the decorator returns the function unchanged
  config = make_config(stack_time_mapping="custom", custom_time_mapping="test_recorder",
                       building_mode="append", max_stacks=4, target_stacks=3, num_time_steps=9)
  masking.TimeStepMasking(config).get_time_step_for_stack(0)
  assert calls == [(2, 4, 9)]


# --- Time as input --------------------------------------------------------------------------------

def test_sampled_time_steps_are_valid_spread_and_deterministic():
  masker = masking.TimeStepMasking(make_config(time_interpretation="input", num_time_steps=16))
  ids = jnp.arange(2000, dtype=jnp.int32)
  steps = masker.sample_time_steps(ids, salt=3)
  assert steps.dtype == jnp.int32 and steps.shape == (2000,)
  s = np.asarray(steps)
  assert s.min() >= 0 and s.max() <= 15
  assert len(np.unique(s)) == 16                                        # covers the whole range
  assert np.abs(np.bincount(s, minlength=16) / 2000 - 1 / 16).max() < 0.03   # roughly uniform
  np.testing.assert_array_equal(masker.sample_time_steps(ids, salt=3), s)
  # A step depends on its example id, not on which batch it is drawn in.
  np.testing.assert_array_equal(masker.sample_time_steps(ids[::-1][:7], salt=3), s[::-1][:7])
  assert (np.asarray(masker.sample_time_steps(ids, salt=4)) != s).mean() > 0.5


def test_time_steps_for_batch_by_interpretation():
  batch = token_batch(batch_size=5)
  depth = masking.TimeStepMasking(make_config(time_interpretation="depth", building_mode="prepend"))
  np.testing.assert_array_equal(depth.time_steps_for_batch(batch, 2, salt=0), [8] * 5)
  inp = masking.TimeStepMasking(make_config(time_interpretation="input"))
  np.testing.assert_array_equal(inp.time_steps_for_batch(batch, 2, salt=1),
                                inp.sample_time_steps(batch["example_id"], salt=1))


# --- Mask ratio -----------------------------------------------------------------------------------

def test_mask_ratio_endpoints_and_midpoint():
  assert objectives.mask_ratio(0, 16, 0.15) == pytest.approx(0.15)
  assert objectives.mask_ratio(15, 16, 0.15) == 1.0
  assert objectives.mask_ratio(5, 11, 0.2) == pytest.approx(0.6)      # 0.2 + 0.8 * 5 / 10
  assert objectives.mask_ratio(0, 1, 0.3) == pytest.approx(0.3)       # one step: min ratio
  ratios = objectives.mask_ratio(jnp.array([0, 5, 10]), 11, 0.2)
  np.testing.assert_allclose(ratios, [0.2, 0.6, 1.0], rtol=1e-6)


def test_mask_ratio_for_stack():
  mlm = masking.TimeStepMasking(make_config(training_objective="mlm", building_mode="prepend",
                                            num_time_steps=17, time_per_stack=4))
  assert mlm.mask_ratio_for_stack(2) == pytest.approx(0.15 + 0.85 * 8 / 16)
  clm = masking.TimeStepMasking(make_config(training_objective="clm"))
  assert clm.mask_ratio_for_stack(2) == 0.0
  # Time as input: the expected ratio over t uniform on 0..N-1.
  inp = masking.TimeStepMasking(make_config(training_objective="mlm", time_interpretation="input"))
  assert inp.mask_ratio_for_stack(0) == pytest.approx(0.15 + 0.85 / 2)


# --- CLM ------------------------------------------------------------------------------------------

def test_clm_targets_shift_left_and_last_position_never_counts():
  batch = token_batch()
  batch["tokens"] = batch["tokens"].at[1, 5].set(PAD)
  ex = masking.make_training_example(batch, jnp.zeros(4, jnp.int32), objective="clm", seed=0,
                                     num_time_steps=16, min_ratio=0.15, mask_token_id=MASK)
  tokens = np.asarray(batch["tokens"])
  np.testing.assert_array_equal(ex["inputs"], tokens)
  np.testing.assert_array_equal(np.asarray(ex["targets"])[:, :-1], tokens[:, 1:])
  expected = np.ones(tokens.shape, np.float32)
  expected[:, -1] = 0.0
  expected[1, 4] = 0.0          # its target is the pad at position 5
  np.testing.assert_array_equal(ex["loss_mask"], expected)
  assert ex["loss_mask"].dtype == jnp.float32 and ex["targets"].dtype == jnp.int32


def test_clm_mask_and_combined_masks():
  np.testing.assert_array_equal(objectives.clm_mask(2, 3), [[1, 1, 0], [1, 1, 0]])
  combined = masking.combined_masks(objectives.clm_mask(1, 3), jnp.array([[True, False, True]]))
  assert combined.dtype == jnp.float32
  np.testing.assert_array_equal(combined, [[1, 0, 0]])


# --- MLM ------------------------------------------------------------------------------------------

def _mlm(batch, steps, seed=0, n=16):
  return masking.make_training_example(batch, jnp.asarray(steps, jnp.int32), objective="mlm",
                                       seed=seed, num_time_steps=n, min_ratio=0.15,
                                       mask_token_id=MASK)


def test_mlm_loss_only_on_replaced_positions():
  batch = token_batch(batch_size=8, seq_len=32)
  ex = _mlm(batch, np.arange(8) * 2)
  tokens, inputs = np.asarray(batch["tokens"]), np.asarray(ex["inputs"])
  loss_mask = np.asarray(ex["loss_mask"])
  replaced = inputs != tokens          # tokens are bytes < 256, so any replacement is visible
  assert np.all(loss_mask[~replaced] == 0)
  assert np.all(inputs[loss_mask == 1] == MASK)
  np.testing.assert_array_equal(ex["targets"], tokens)
  np.testing.assert_array_equal(loss_mask, replaced.astype(np.float32))


def test_mlm_pad_targets_do_not_count():
  batch = token_batch(batch_size=2, seq_len=8)
  batch["tokens"] = batch["tokens"].at[:, 4:].set(PAD)
  ex = _mlm(batch, [15, 15])           # t = N-1 masks everything
  np.testing.assert_array_equal(ex["inputs"], np.full((2, 8), MASK))
  np.testing.assert_array_equal(ex["loss_mask"], [[1] * 4 + [0] * 4] * 2)


@pytest.mark.parametrize("objective", ["mlm", "clm"])
def test_pad_targets_are_the_tokenizers_pad_id(objective):
  """The loss drops targets equal to the pad id it is given, whatever its value, and no other."""
  batch = token_batch(batch_size=3, seq_len=8)
  tokens = np.asarray(batch["tokens"]).copy()
  tokens[:, 3], tokens[0, 5], tokens[1, 6] = 7, 256, PAD   # 256 is an ordinary id here
  batch["tokens"] = jnp.asarray(tokens)
  ex = masking.make_training_example(batch, jnp.full(3, 15, jnp.int32), objective=objective,
                                     seed=0, num_time_steps=16, min_ratio=0.15, mask_token_id=MASK,
                                     pad_id=7)
  if objective == "mlm":   # t = N-1 masks every position: the loss is on every non-pad target
    expected = (tokens != 7).astype(np.float32)
  else:                    # next tokens; the last position has none
    expected = np.concatenate([tokens[:, 1:] != 7, np.zeros((3, 1), bool)], axis=1).astype(np.float32)
  np.testing.assert_array_equal(ex["loss_mask"], expected)


@pytest.mark.parametrize("t", [0, 5, 10, 15])
def test_mlm_masked_fraction_near_mask_ratio(t):
  ids = jnp.arange(512, dtype=jnp.int32)
  mask = objectives.mlm_mask(ids, jnp.full((512,), t, jnp.int32), 128, seed=1, num_time_steps=16,
                          min_ratio=0.15)
  assert mask.dtype == jnp.bool_ and mask.shape == (512, 128)
  assert float(mask.mean()) == pytest.approx(0.15 + 0.85 * t / 15, abs=0.01)


def test_mlm_mask_depends_only_on_example_id_time_step_and_seed():
  kw = dict(seed=7, num_time_steps=16, min_ratio=0.15)
  ids = jnp.array([11, 42, 99], jnp.int32)
  steps = jnp.array([3, 3, 3], jnp.int32)
  ref = np.asarray(objectives.mlm_mask(ids, steps, 64, **kw))[1]          # example 42 in row 1
  # Example 42 in row 0 of a different, larger batch with different neighbours.
  other = objectives.mlm_mask(jnp.array([42, 5, 6, 7], jnp.int32),
                              jnp.array([3, 9, 0, 15], jnp.int32), 64, **kw)
  np.testing.assert_array_equal(np.asarray(other)[0], ref)
  alone = objectives.mlm_mask(jnp.array([42], jnp.int32), jnp.array([3], jnp.int32), 64, **kw)
  np.testing.assert_array_equal(np.asarray(alone)[0], ref)
  # Independent recomputation of the documented rule.
  key = jax.random.fold_in(jax.random.fold_in(jax.random.key(7), 42), 3)
  u = np.asarray(jax.random.uniform(key, (64,)))
  np.testing.assert_array_equal(ref, u < 0.15 + 0.85 * 3 / 15)
  # A different time step or seed gives a different mask.
  other_t = objectives.mlm_mask(jnp.array([42], jnp.int32), jnp.array([4], jnp.int32), 64, **kw)
  assert not np.array_equal(np.asarray(other_t)[0], ref)
  kw_seed = dict(kw, seed=8)
  other_seed = objectives.mlm_mask(jnp.array([42], jnp.int32), jnp.array([3], jnp.int32), 64,
                                   **kw_seed)
  assert not np.array_equal(np.asarray(other_seed)[0], ref)


def test_mlm_every_example_has_a_masked_position():
  # Short sequences at a low ratio: about 0.85**4 ~ 52% of rows would draw no mask at all.
  ids = jnp.arange(256, dtype=jnp.int32)
  mask = np.asarray(objectives.mlm_mask(ids, jnp.zeros(256, jnp.int32), 4, seed=0, num_time_steps=16,
                                     min_ratio=0.15))
  assert mask.any(axis=1).all()
  # The forced position is the smallest draw of the example's own key.
  for i in range(256):
    u = np.asarray(jax.random.uniform(jax.random.fold_in(jax.random.fold_in(jax.random.key(0), i), 0),
                                      (4,)))
    expected = u < 0.15
    if not expected.any():
      expected[np.argmin(u)] = True
    np.testing.assert_array_equal(mask[i], expected)


def test_generate_masks_for_stack_uses_the_stack_time_step():
  config = make_config(training_objective="mlm", building_mode="prepend", time_interpretation="depth")
  masker = masking.TimeStepMasking(config)
  batch = token_batch(batch_size=3, seq_len=16)
  ex = masker.generate_masks_for_stack(batch, 1)
  np.testing.assert_array_equal(ex["time_step"], [4, 4, 4])
  np.testing.assert_array_equal(ex["inputs"], _mlm(batch, [4, 4, 4])["inputs"])


# --- Custom objective -----------------------------------------------------------------------------

def test_custom_objective_needs_targets():
  with pytest.raises(ValueError, match=r"training_objective='custom': needs batches with 'targets'"):
    masking.make_training_example(token_batch(), jnp.zeros(4, jnp.int32), objective="custom", seed=0,
                                  num_time_steps=16, min_ratio=0.15, mask_token_id=MASK)


def test_custom_objective_passes_targets_and_loss_mask_through():
  batch = token_batch(batch_size=2, seq_len=4)
  batch["targets"] = jnp.array([[1, 2, PAD, 4], [5, 6, 7, 8]], jnp.int32)
  batch["loss_mask"] = jnp.array([[1, 1, 1, 0], [0, 1, 1, 1]], jnp.float32)
  ex = masking.make_training_example(batch, jnp.zeros(2, jnp.int32), objective="custom", seed=0,
                                     num_time_steps=16, min_ratio=0.15, mask_token_id=MASK)
  np.testing.assert_array_equal(ex["inputs"], batch["tokens"])
  np.testing.assert_array_equal(ex["targets"], batch["targets"])
  np.testing.assert_array_equal(ex["loss_mask"], [[1, 1, 0, 0], [0, 1, 1, 1]])   # pad drops too


def test_unknown_objective_raises_with_field_path():
  with pytest.raises(ValueError, match=r"training\.progressive\.training_objective='rlhf'"):
    masking.make_training_example(token_batch(), jnp.zeros(4, jnp.int32), objective="rlhf", seed=0,
                                  num_time_steps=16, min_ratio=0.15, mask_token_id=MASK)


# --- jit ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("objective", ["mlm", "clm", "custom"])
def test_make_training_example_under_jit_matches_eager(objective):
  batch = token_batch(batch_size=4, seq_len=16)
  batch["targets"] = jnp.roll(batch["tokens"], 1, axis=1)
  steps = jnp.array([0, 3, 9, 15], jnp.int32)
  fn = functools.partial(masking.make_training_example, objective=objective, seed=5,
                         num_time_steps=16, min_ratio=0.15, mask_token_id=MASK)
  jitted, eager = jax.jit(fn)(batch, steps), fn(batch, steps)
  assert jitted.keys() == eager.keys() == {"inputs", "targets", "loss_mask", "time_step"}
  for k in eager:
    assert jitted[k].dtype == eager[k].dtype
    np.testing.assert_array_equal(jitted[k], eager[k])

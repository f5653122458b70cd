"""Sampling (design §12): KV-cache generation against full recomputation, unmasking that only
fills masks, a trained rack that completes Python better than an untrained one, and the command."""
import re

import jax
import numpy as np
import pytest

from conftest import micro_config, text_config, train_run
from stackwise_jax import ConfigError
from stackwise_jax.cli import main
from stackwise_jax.data import make_dataloader
from stackwise_jax.data.tokenizer import MASK_ID, decode, encode
from stackwise_jax.progressive import ProgressiveRackBuilder, ProgressiveTrainer
from stackwise_jax.sample import generate, parse_infill, prompt_batch, unmask


def _rack(trunk="frozen", **progressive):
  """An untrained two-stack rack: the first stack frozen or an int4 + adapter trunk."""
  qlora = dict(qlora_enabled=True, progressive_qlora=True, quant_block_size=16)
  config = micro_config(target_stacks=2, **progressive, **(qlora if trunk == "qlora" else {}))
  builder = ProgressiveRackBuilder(config)
  builder.append_stack()
  builder.freeze_all_but_qlora() if trunk == "qlora" else builder.freeze_trunk()
  builder.append_stack()
  return builder.build_rack()


@pytest.mark.parametrize("trunk", ["frozen", "qlora"])
def test_kv_cache_decoding_gives_the_full_forward_logits(trunk):
  rack = _rack(trunk)
  tokens = jax.random.randint(jax.random.key(1), (2, 12), 0, 256)
  full = rack(rack.params, tokens)
  step = jax.jit(rack.decode)
  logits, cache = step(rack.params, tokens[:, :7], rack.init_cache(2, 12), 0)
  steps = [logits]
  for pos in range(7, 12):   # then one position per call
    logits, cache = step(rack.params, tokens[:, pos:pos + 1], cache, pos)
    steps.append(logits)
  np.testing.assert_allclose(np.concatenate(steps, axis=1), full, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("trunk,options", [("frozen", {}), ("qlora", {}),
                                           ("frozen", dict(temperature=0.8, top_k=20, seed=3))])
def test_kv_cache_generation_gives_the_tokens_of_full_recompute(trunk, options):
  rack = _rack(trunk)
  prompt = np.stack([encode("import o"), encode("def main")])
  cached = generate(rack, prompt, 12, **options)
  recomputed = generate(rack, prompt, 12, use_cache=False, **options)
  np.testing.assert_array_equal(cached, recomputed)
  np.testing.assert_array_equal(cached[:, :8], prompt)
  assert cached.shape == (2, 20) and cached.max() < 256


def _masked(seed=0):
  """Random bytes with about half the positions masked."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, 256, (3, 16)).astype(np.int32)
  return np.where(rng.random((3, 16)) < 0.5, MASK_ID, tokens)


@pytest.mark.parametrize("time", ["input", "depth"])
def test_unmasking_fills_every_mask_and_nothing_else(time):
  rack = _rack(training_objective="mlm", time_interpretation=time)
  tokens = _masked()
  filled = unmask(rack, tokens, steps=4)
  assert (tokens == MASK_ID).sum() > 10 and not (filled == MASK_ID).any()
  kept = tokens != MASK_ID
  np.testing.assert_array_equal(filled[kept], tokens[kept])
  assert filled.max() < 256


def test_unmasking_reveals_masks_step_by_step():
  """With time as input, k of n steps leave n0 (n - k) / n masks (rounded down per row)."""
  rack = _rack(training_objective="mlm", time_interpretation="input")
  tokens = _masked(1)
  n0 = (tokens == MASK_ID).sum(-1)
  left = []
  for steps in (1, 2, 3, 4):
    partial = unmask(rack, tokens, steps=4, stop_after=steps)
    left.append((partial == MASK_ID).sum(-1))
    np.testing.assert_array_equal(partial[tokens != MASK_ID], tokens[tokens != MASK_ID])
  np.testing.assert_array_equal(left, [n0 * (4 - k) // 4 for k in (1, 2, 3, 4)])


@pytest.mark.parametrize("time", ["input", "depth"])
def test_unmasking_fills_exactly_the_configured_mask_token_id(time):
  """A run with mask_token_id=258 fills the 258s; the tokenizer's MASK_ID is an ordinary token."""
  rack = _rack(training_objective="mlm", time_interpretation=time, mask_token_id=258)
  rng = np.random.default_rng(2)
  tokens = np.where(rng.random((3, 16)) < 0.2, MASK_ID, _masked(2))   # _masked puts MASK_IDs
  tokens = np.where(tokens == MASK_ID, rng.choice([MASK_ID, 258], tokens.shape), tokens)
  filled = unmask(rack, tokens, steps=4)
  chosen = tokens == 258
  assert chosen.sum() > 5 and (tokens == MASK_ID).sum() > 5
  assert (filled[chosen] < 256).all()                         # every 258 became a byte
  np.testing.assert_array_equal(filled[~chosen], tokens[~chosen])   # MASK_ID included


def test_sample_input_masks_with_the_configured_mask_token_id():
  mlm = micro_config(training_objective="mlm", mask_token_id=258)
  assert prompt_batch(mlm, prompt="ab", max_new_tokens=2).tolist() == [[97, 98, 258, 258]]
  assert prompt_batch(mlm, infill="a[MASK:2]").tolist() == [[97, 258, 258]]


def test_infill_markers_and_bad_options_are_checked_before_sampling():
  ids = parse_infill("The [MASK:3] sat[MASK]", MASK_ID)
  assert decode(ids) == "The  sat" and list(ids[4:7]) == [MASK_ID] * 3 and ids[-1] == MASK_ID
  clm, mlm = micro_config(), micro_config(training_objective="mlm")
  assert prompt_batch(mlm, prompt="ab", max_new_tokens=3).tolist() == [[97, 98] + [MASK_ID] * 3]
  for config, kwargs, needle in [
      (clm, dict(infill="a [MASK]"), "--infill needs a masked-LM"),
      (mlm, dict(infill="no marker"), "no \\[MASK\\]"),
      (clm, dict(prompt="x", temperature=-1.0), "--temperature=-1.0"),
      (clm, dict(prompt="x", top_k=300), "--top-k=300"),
      (clm, dict(prompt="x", max_new_tokens=40), "model.max_seq_len=32"),
      (clm, dict(prompt="x", infill="y [MASK]"), "exactly one of"),
      (mlm, dict(prompt="x", steps=0), "--steps=0")]:
    with pytest.raises(ConfigError, match=needle):
      prompt_batch(config, **kwargs)


# --- A rack trained on the built-in corpus (the Python standard library). ---

PROMPTS = ["import ", "from ", "def ", "class ", "    return ", "self."]
_PYTHON_BYTES = re.compile(rb"[a-z_. ()\n:,]")


def _plausible(rack) -> float:
  """Share of greedily generated bytes that can follow these prefixes in ordinary Python source:
  lowercase letters, '_', '.', ' ', '(', ')', ',', ':' and newlines."""
  n = max(len(p) for p in PROMPTS)
  generated = []
  for prompt in PROMPTS:   # prompts of different lengths: one call each
    out = generate(rack, encode(prompt)[None], 12 + n - len(prompt))
    generated.append(bytes(out[0, len(encode(prompt)):].astype(np.uint8).tolist()))
  data = b"".join(generated)
  return len(_PYTHON_BYTES.findall(data)) / len(data)


def test_trained_rack_completes_python_more_plausibly_than_untrained():
  config = micro_config(target_stacks=1)
  config.model.max_seq_len, config.training.seq_len = 64, 64
  config.training.batch_size, config.training.steps_per_stack = 16, 300
  config.training.lr, config.training.warmup_steps, config.training.eval_batches = 3e-3, 20, 1
  builder = ProgressiveRackBuilder(config)
  untrained = _plausible(_untrained(config))
  ProgressiveTrainer(config, progress=False, log=lambda _: None).train_progressively(
      builder, make_dataloader(config))
  trained = _plausible(builder.build_rack())
  assert trained > untrained + 0.3, (trained, untrained)


def _untrained(config):
  builder = ProgressiveRackBuilder(config)
  builder.append_stack()
  return builder.build_rack()


# --- The command. ---


@pytest.fixture(scope="module")
def workdirs(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("sample")
  corpus = tmp / "corpus.txt"
  corpus.write_text(" ".join(f"word{i % 37} the quick brown fox" for i in range(3000)))
  runs = {}
  for objective in ("clm", "mlm"):
    config = text_config(str(corpus), target_stacks=2, training_objective=objective)
    config.training.checkpoint_every = 0
    train_run(config, tmp / objective)
    runs[objective] = tmp / objective
  return runs


def test_sample_command_generates_and_fills(workdirs, capsys):
  assert main(["sample", "--workdir", str(workdirs["clm"]), "--prompt", "the qu",
               "--max-new-tokens", "5", "--num-samples", "2", "--temperature", "1.0",
               "--top-k", "5"]) == 0
  samples = capsys.readouterr().out.split("--- sample ")[1:]
  assert [s.split(" ---\n")[0] for s in samples] == ["1", "2"]
  assert all(s.split(" ---\n")[1].startswith("the qu") for s in samples)
  assert main(["sample", "--workdir", str(workdirs["mlm"]), "--infill", "the [MASK:5] brown",
               "--steps", "3"]) == 0
  out = capsys.readouterr().out
  assert out.startswith("the ") and out.endswith(" brown\n") and "sample" not in out


def test_sample_command_refuses_bad_options_with_one_line(workdirs, capsys):
  assert main(["sample", "--workdir", str(workdirs["clm"]), "--infill", "a [MASK]"]) == 2
  assert "--infill needs a masked-LM" in capsys.readouterr().err
  assert main(["sample", "--workdir", str(workdirs["mlm"]), "--prompt", "x",
               "--step", "5"]) == 2
  assert "--step=5" in capsys.readouterr().err

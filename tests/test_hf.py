"""Hugging Face interop (design §12), with transformers as the reference implementation: an
exported rack is a `LlamaForCausalLM` whose logits and greedy tokens are ours, its tokenizer
encodes to our ids, and a Llama saved by transformers imports as the trunk new stacks grow on."""
import json

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from stackwise_jax import ConfigError, ProgressiveRackBuilder  # noqa: E402
from stackwise_jax.cli import main  # noqa: E402
from stackwise_jax.data.tokenizer import BYTES, load_file, train_bpe  # noqa: E402
from stackwise_jax.hf.llama import export_hf  # noqa: E402
from stackwise_jax.quant import is_stored_leaf  # noqa: E402
from stackwise_jax.trees import plain_keys  # noqa: E402
from stackwise_jax.sample import generate  # noqa: E402
from conftest import (TRUNKS, assert_same_run, cut_copy, micro_config, text_config,  # noqa: E402
                      train_run, write_corpus)

TOKENS = np.random.default_rng(0).integers(0, 256, (2, 24)).astype(np.int32)
MIXED_TEXT = "def f(x):\n\treturn x  # ünïcödé, naïve café 😀🚀\r\nEnd."


def _randomized(builder, scale=0.3):
  """Every float param of `builder` but stored kernels' drawn again (adapters' B included, so
  they matter; norms around 1), large enough that logits spread and greedy picks have no near
  ties."""
  keys = iter(jax.random.split(jax.random.key(1), 10_000))

  def draw(path, x):
    keys_ = plain_keys(path)
    if not np.issubdtype(x.dtype, np.floating) or is_stored_leaf(keys_):
      return x
    noise = jax.random.normal(next(keys), x.shape) * scale
    return (noise + (1.0 if keys_[-1] == "scale" else 0.0)).astype(x.dtype)

  builder.params = jax.tree_util.tree_map_with_path(draw, builder.params)
  return builder


def _rack(grow=("append", "append"), trained=1, freeze="frozen", scale=0.3, **fields):
  """A rack grown by `grow` (builder calls), its first `trained` stacks trained and frozen (or
  `freeze="qlora"`), params random (`scale`: their spread; bf16 rounding grows with it)."""
  config = micro_config(**{"target_stacks": len(grow), **fields.pop("progressive", {})})
  for key, value in fields.items():
    config.model[key] = value
  builder = ProgressiveRackBuilder(config)
  for how in grow:
    getattr(builder, f"{how}_stack")()
    if len(builder.specs) == trained:
      builder.trained.update(s.name for s in builder.specs)
      (builder.freeze_trunk if freeze == "frozen" else builder.freeze_all_but_qlora)()
  return _randomized(builder, scale).build_rack()


def _hf_logits(directory, tokens=TOKENS, dtype=torch.float32):
  model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=dtype)
  with torch.no_grad():
    return model(torch.tensor(tokens, dtype=torch.long)).logits.float().numpy(), model


def _assert_close(ours, theirs, rel):
  ours = np.asarray(ours)
  scale = np.abs(ours).max()
  assert np.abs(ours - theirs).max() <= rel * scale, (np.abs(ours - theirs).max(), scale)


@pytest.mark.parametrize("name, rack_kwargs", [
    ("append", {}),
    ("prepend", {"grow": ("prepend", "prepend")}),
    ("mixed", {"grow": ("append", "prepend", "append"), "n_blocks_per_stack": 2}),
    ("gqa_untied", {"attention": "gqa", "n_kv_heads": 1, "tie_embeddings": False}),
])
def test_exported_llama_gives_our_logits(tmp_path, name, rack_kwargs):
  rack = _rack(**rack_kwargs)
  files = export_hf(rack, str(tmp_path), tokenizer=BYTES, record={"run": name})
  assert [f.rsplit("/", 1)[-1] for f in files] == ["model.safetensors"]
  logits, model = _hf_logits(str(tmp_path))
  assert model.config.num_hidden_layers == sum(s.n_blocks for s in rack.specs)
  assert model.config.tie_word_embeddings == rack.config.model.tie_embeddings
  _assert_close(rack(rack.params, TOKENS), logits, 1e-4)
  record = json.loads((tmp_path / "stackwise.json").read_text())
  assert record["run"] == name and [s["stack"] for s in record["stacks"]] == list(rack.order)


def test_a_large_export_is_sharded_with_an_index_both_sides_read(tmp_path):
  rack = _rack(tie_embeddings=False)
  files = export_hf(rack, str(tmp_path / "hf"), tokenizer=BYTES, record={}, max_shard_bytes=40_000)
  index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
  assert len(files) > 2 and sorted(set(index["weight_map"].values())) == [
      f.rsplit("/", 1)[-1] for f in files]
  logits, _ = _hf_logits(str(tmp_path / "hf"))
  _assert_close(rack(rack.params, TOKENS), logits, 1e-4)
  back = ProgressiveRackBuilder.from_pretrained(str(tmp_path / "hf"), micro_config()).build_rack()
  _assert_close(back(back.params, TOKENS), logits, 1e-4)


def test_bfloat16_export_is_close(tmp_path):
  rack = _rack(attention="gqa", n_kv_heads=1, scale=0.05)
  export_hf(rack, str(tmp_path), tokenizer=BYTES, record={}, dtype="bfloat16")
  logits, model = _hf_logits(str(tmp_path), dtype=torch.bfloat16)
  assert model.dtype == torch.bfloat16
  _assert_close(rack(rack.params, TOKENS), logits, 2e-2)


@pytest.mark.parametrize("name, kwargs", [
    ("qlora_trunk", dict(freeze="qlora", progressive=dict(
        trunk_strategy="qlora", qlora_enabled=True, progressive_qlora=True, quant_block_size=16))),
    ("nvfp4", dict(progressive=dict(new_stack_precision="nvfp4", progressive_qlora=True))),
])
def test_quantized_stacks_export_dequantized_with_adapters_merged(tmp_path, name, kwargs):
  rack = _rack(scale=0.05, **kwargs)
  export_hf(rack, str(tmp_path / "hf"), tokenizer=BYTES, record={})
  logits, _ = _hf_logits(str(tmp_path / "hf"))
  # Our own forward of the dequantized, merged weights: the export imported as float stacks.
  config = micro_config(target_stacks=3)
  merged = ProgressiveRackBuilder.from_pretrained(str(tmp_path / "hf"), config).build_rack()
  assert all(s.format is None and s.lora is None for s in merged.specs)
  _assert_close(merged(merged.params, TOKENS), logits, 1e-4)
  # ... and that is what the quantized rack computes, up to its bf16 compute.
  _assert_close(rack(rack.params, TOKENS), logits, 2e-2)
  stacks = json.loads((tmp_path / "hf" / "stackwise.json").read_text())["stacks"]
  assert stacks[0]["format"] == {"qlora_trunk": "int4", "nvfp4": "nvfp4"}[name]
  assert stacks[0]["progressive_lora"] is not None


def test_greedy_generate_equals_our_sampler(tmp_path):
  rack = _rack(attention="gqa", n_kv_heads=1, max_seq_len=48)
  export_hf(rack, str(tmp_path), tokenizer=BYTES, record={})
  prompt = TOKENS[:1, :8]
  ours = generate(rack, prompt, 32)
  model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32)
  theirs = model.generate(torch.tensor(prompt, dtype=torch.long), max_new_tokens=32,
                          do_sample=False, min_new_tokens=32).numpy()
  np.testing.assert_array_equal(ours, theirs)


def _plain_bpe_json(tmp_path):
  """A tokenizer.json with none of our special tokens (the run adds them after its ids)."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator([MIXED_TEXT * 3, "the quick brown fox " * 20], trainers.BpeTrainer(
      vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
  path = tmp_path / "plain.json"
  tok.save(str(path))
  return load_file(str(path))


def _sentencepiece(tmp_path):
  """A byte-fallback SentencePiece model without pad or mask pieces (the run adds them)."""
  spm = pytest.importorskip("sentencepiece")
  (tmp_path / "corpus.txt").write_text("the quick brown fox jumps over the lazy dog\n" * 50
                                       + MIXED_TEXT * 5)
  spm.SentencePieceTrainer.train(
      input=str(tmp_path / "corpus.txt"), model_prefix=str(tmp_path / "sp"), vocab_size=304,
      byte_fallback=True, character_coverage=1.0, normalization_rule_name="identity",
      remove_extra_whitespaces=False, add_dummy_prefix=False, allow_whitespace_only_pieces=True,
      minloglevel=2)
  return load_file(str(tmp_path / "sp.model"))


@pytest.mark.parametrize("kind", ["bytes", "bpe", "tokenizer_json", "sentencepiece"])
def test_exported_tokenizer_encodes_to_our_ids(tmp_path, kind):
  tokenizer = {"bytes": lambda: BYTES,
               "bpe": lambda: train_bpe([MIXED_TEXT * 3, "the quick brown fox " * 20], 300),
               "tokenizer_json": lambda: _plain_bpe_json(tmp_path),
               "sentencepiece": lambda: _sentencepiece(tmp_path)}[kind]()
  out = tmp_path / "hf"
  rack = _rack(vocab_size=max(tokenizer.vocab_size, 260))
  export_hf(rack, str(out), tokenizer=tokenizer, record={})
  theirs = transformers.AutoTokenizer.from_pretrained(str(out))
  ids = theirs(MIXED_TEXT)["input_ids"]
  np.testing.assert_array_equal(ids, tokenizer.encode(MIXED_TEXT))
  assert theirs.decode(ids) == tokenizer.decode(ids) == MIXED_TEXT
  assert (theirs.bos_token_id, theirs.eos_token_id) == (tokenizer.special.bos, tokenizer.special.eos)
  config = json.loads((out / "config.json").read_text())
  assert (config["bos_token_id"], config["pad_token_id"]) == (tokenizer.special.bos,
                                                             tokenizer.special.pad)


# --- import -------------------------------------------------------------------------------------

def _saved_llama(directory, layers=4, tie=False):
  """A random LlamaForCausalLM as transformers saves it (GQA, byte vocabulary)."""
  torch.manual_seed(0)
  config = transformers.LlamaConfig(
      vocab_size=260, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
      rms_norm_eps=1e-6, rope_theta=500.0, tie_word_embeddings=tie, initializer_range=0.2)
  model = transformers.LlamaForCausalLM(config)
  with torch.no_grad():   # norms that are not all ones, so a missed norm shows
    for name, p in model.named_parameters():
      if "norm" in name:
        p.add_(torch.randn_like(p) * 0.3)
  model.save_pretrained(str(directory))
  return model


def test_imported_llama_grows_and_exports_again(tmp_path):
  model = _saved_llama(tmp_path / "llama")
  config = text_config(write_corpus(tmp_path), target_stacks=4, new_stack_init="identity")
  config.model.n_blocks_per_stack = 2
  builder = ProgressiveRackBuilder.from_pretrained(str(tmp_path / "llama"), config)
  assert builder.config.model.attention == "gqa" and builder.config.model.rope_theta == 500.0
  assert [s.n_blocks for s in builder.specs] == [2, 2] and builder.trained == {"stack_0", "stack_1"}
  rack = builder.build_rack()
  with torch.no_grad():
    theirs = model(torch.tensor(TOKENS[:, :16], dtype=torch.long)).logits.numpy()
  _assert_close(rack(rack.params, TOKENS[:, :16]), theirs, 1e-4)
  imported = jax.tree.map(np.asarray, builder.params["stacks"])
  # LLaMA Pro's block expansion, on top: an identity stack leaves the pretrained model's logits.
  grown = ProgressiveRackBuilder.from_pretrained(str(tmp_path / "llama"), config)
  grown.add_stack()
  grown = grown.build_rack()
  assert len(grown.specs) == 3
  _assert_close(grown(grown.params, TOKENS[:, :16]), theirs, 1e-4)

  results, params = train_run(builder.config, tmp_path / "run")   # from init_from, as the CLI does
  assert len(results["stages"]) == 2
  assert sorted(params["stacks"]) == [f"stack_{i}" for i in range(4)]
  # Identity growth: the grown model starts as the pretrained one (its first loss, its trunk).
  for name, tree in imported.items():
    jax.tree.map(np.testing.assert_array_equal, tree,
                 jax.tree.map(lambda x: np.asarray(x, np.float32), params["stacks"][name]))

  assert main(["export", "--workdir", str(tmp_path / "run"), "--format", "hf",
               "--out", str(tmp_path / "grown")]) == 0
  logits, grown = _hf_logits(str(tmp_path / "grown"), TOKENS[:, :16])
  assert grown.config.num_hidden_layers == 8
  from stackwise_jax import load_rack
  trained = load_rack(str(tmp_path / "run"))
  _assert_close(trained(trained.params, TOKENS[:, :16]), logits, 1e-4)


def test_an_imported_qlora_trunk_resumes_exactly_and_samples(tmp_path, capsys):
  _saved_llama(tmp_path / "llama", layers=2)
  config = text_config(write_corpus(tmp_path), target_stacks=3, **TRUNKS["qlora"])
  config.training.progressive.init_from = str(tmp_path / "llama")
  whole = train_run(config, tmp_path / "whole")
  assert [s["activation_mode"] for s in whole[0]["stages"]] == ["streamed"]   # a LoRA trunk
  cut_copy(tmp_path / "whole", tmp_path / "cut", 3)   # cut off at step 3 of the one stage
  assert_same_run(whole, train_run(config, tmp_path / "cut"))
  capsys.readouterr()
  assert main(["sample", "--workdir", str(tmp_path / "cut"), "--prompt", "the quick",
               "--max-new-tokens", "8"]) == 0
  assert capsys.readouterr().out.strip()
  assert main(["eval", "--workdir", str(tmp_path / "cut")]) == 0
  rows = json.loads((tmp_path / "cut" / "eval.json").read_text())["racks"]
  np.testing.assert_allclose(rows[-1]["loss"], whole[0]["final_eval_loss"], rtol=1e-5)


def _train_cli(tmp_path, *overrides):
  config = tmp_path / "config.py"
  config.write_text("from conftest import micro_config\n"
                    "def get_config():\n  c = micro_config(target_stacks=3)\n"
                    f"  c.data.source, c.data.paths = 'text', ({write_corpus(tmp_path)!r},)\n"
                    "  return c\n")
  return main(["train", "--config", str(config), "--workdir", str(tmp_path / "run"),
               "--no-progress", *overrides])


@pytest.mark.parametrize("case, expected", [
    ("no_config", "no config.json there"),
    ("not_llama", "model_type='gpt2': allowed: 'llama'"),
    ("indivisible", "model.n_blocks_per_stack=3: "),
    ("d_model", "model.d_model=64: "),
    ("no_weights", "model.safetensors is missing"),
    # from its 2 stacks one stage reaches target_stacks=3: a second entry would never be used
    ("schedule", "stacks_per_stage=(1, 1): allowed: entries before the last summing to less than "
                 "the 1 stacks that target_stacks=3 adds to the 2 imported"),
])
def test_bad_init_from_exits_2_with_one_line(tmp_path, capsys, monkeypatch, case, expected):
  monkeypatch.syspath_prepend(str(pytest.importorskip("conftest").REPO / "tests"))
  llama = tmp_path / "llama"
  _saved_llama(llama, layers=2)
  capsys.readouterr()   # transformers' own progress output
  overrides = [f"--config.training.progressive.init_from={llama}"]
  if case == "no_config":
    (llama / "config.json").unlink()
  elif case == "not_llama":
    hf = json.loads((llama / "config.json").read_text())
    (llama / "config.json").write_text(json.dumps({**hf, "model_type": "gpt2"}))
  elif case == "indivisible":
    overrides.append("--config.model.n_blocks_per_stack=3")
  elif case == "d_model":
    overrides.append("--config.model.d_model=64")
  elif case == "schedule":
    overrides.append("--config.training.progressive.stacks_per_stage=(1, 1)")
  else:
    (llama / "model.safetensors").unlink()
  assert _train_cli(tmp_path, *overrides) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and expected in err, err
  assert not (tmp_path / "run" / "checkpoints").exists()


def test_hf_export_of_a_masked_rack_exits_2(tmp_path, capsys):
  config = text_config(write_corpus(tmp_path), target_stacks=1, training_objective="mlm")
  train_run(config, tmp_path / "run")
  assert main(["export", "--workdir", str(tmp_path / "run"), "--format", "hf"]) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and "--format safetensors keeps" in err, err
  assert not (tmp_path / "run" / "export").exists()
  with pytest.raises(ConfigError, match="a Llama only causally"):
    export_hf(ProgressiveRackBuilder(config).build_rack(), str(tmp_path / "x"), tokenizer=BYTES,
              record={})

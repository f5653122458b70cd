"""Tokenizers (data/tokenizer.py): bytes, a trained byte-level BPE, a tokenizer.json and a
SentencePiece model round-trip text, count its bytes, and carry their special ids through
masking and sampling; bad tokenizer files and vocab sizes are refused by name."""
import pathlib

import jax.numpy as jnp
import numpy as np
import pytest

from stackwise_jax import ProgressiveRackBuilder, TimeStepMasking
from stackwise_jax.config import default_config, validate
from stackwise_jax.errors import ConfigError
from stackwise_jax.data import tokenizer as tk
from conftest import micro_args

TEXT = "def f(x):\n    return x + 1  # héllo ✓ 日本 🙂\n\n\tdone = True\n"
CORPUS = [TEXT * 3] + [f"line {i}: the quick brown fox jumps over the lazy dog {i * i}\n" * 5
                       for i in range(40)]


@pytest.fixture(scope="module")
def bpe():
  return tk.train_bpe(CORPUS, 400)


@pytest.fixture(scope="module")
def files(tmp_path_factory, bpe):
  """A saved BPE, a GPT-2-like tokenizer.json with no pad or mask token, and an
  identity-normalising SentencePiece model with byte fallback."""
  import tokenizers
  from tokenizers import decoders, models, pre_tokenizers, trainers
  root = tmp_path_factory.mktemp("tokenizers")
  bpe.save(str(root))
  raw = tokenizers.Tokenizer(models.BPE())
  raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  raw.decoder = decoders.ByteLevel()
  raw.train_from_iterator(CORPUS, trainers.BpeTrainer(
      vocab_size=350, special_tokens=["<|endoftext|>"], show_progress=False,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  raw.save(str(root / "gpt2like.json"))
  spm = pytest.importorskip("sentencepiece")
  (root / "corpus.txt").write_text("".join(CORPUS))
  spm.SentencePieceTrainer.train(
      input=str(root / "corpus.txt"), model_prefix=str(root / "sp"), vocab_size=340,
      byte_fallback=True, character_coverage=1.0, normalization_rule_name="identity",
      remove_extra_whitespaces=False, add_dummy_prefix=False, allow_whitespace_only_pieces=True,
      minloglevel=2)
  return {"bpe": str(root / "tokenizer.json"), "gpt2like": str(root / "gpt2like.json"),
          "sp": str(root / "sp.model")}


def _all(bpe, files):
  return {"bytes": tk.BYTES, "bpe": bpe, "bpe file": tk.load_file(files["bpe"]),
          "gpt2like": tk.load_file(files["gpt2like"]), "sentencepiece": tk.load_file(files["sp"])}


def test_decode_encode_is_the_text_for_each_tokenizer(bpe, files):
  for name, tok in _all(bpe, files).items():
    ids = tok.encode(TEXT)
    assert ids.dtype == np.int32 and ids.ndim == 1, name
    assert tok.decode(ids) == TEXT, name
    assert not set(ids.tolist()) & set(vars(tok.special).values()), name   # no special added
  assert len(bpe.encode(TEXT)) < len(TEXT.encode())   # it does merge bytes


def test_token_bytes_add_up_to_the_texts_utf8_bytes(bpe, files):
  """Bits per byte divide by these: for any text, the bytes of its tokens are its UTF-8 bytes;
  special ids count none."""
  for name, tok in _all(bpe, files).items():
    assert tok.token_bytes.shape == (tok.vocab_size,), name
    for text in (TEXT, CORPUS[5], "ü"):
      assert tok.token_bytes[tok.encode(text)].sum() == len(text.encode("utf-8")), (name, text)
    assert (tok.token_bytes[list(vars(tok.special).values())] == 0).all(), name


def test_special_ids_come_from_the_tokenizer(bpe, files):
  assert bpe.special == tk.SpecialIds(pad=0, mask=1, bos=2, eos=3)   # known before training
  assert [bpe.decode([i]) for i in range(4)] == [""] * 4 and bpe.added == ()
  gpt2 = tk.load_file(files["gpt2like"])
  # its <|endoftext|> serves as bos and eos; pad and mask are added after its 350 ids
  eot = gpt2._tok.token_to_id("<|endoftext|>")
  assert (gpt2.special.bos, gpt2.special.eos) == (eot, eot)
  assert gpt2.added == ("<pad>", "<mask>")
  assert (gpt2.special.pad, gpt2.special.mask, gpt2.vocab_size) == (350, 351, 352)
  sp = tk.load_file(files["sp"])
  assert (sp.special.bos, sp.special.eos) == (sp._sp.bos_id(), sp._sp.eos_id())
  assert (sp.special.pad, sp.special.mask, sp.vocab_size) == (340, 341, 342)


def _config(tokenizer, vocab_size, **progressive):
  c = default_config()
  c.data.tokenizer, c.model.vocab_size = tokenizer, vocab_size
  for key, value in progressive.items():
    c.training.progressive[key] = value
  return validate(c)


def test_special_ids_of_a_config_take_mask_token_id_where_set(files):
  assert tk.special_ids(default_config()) == tk.BYTES.special
  assert tk.special_ids(_config("bpe:400", 400)) == tk.SpecialIds(0, 1, 2, 3)
  assert tk.special_ids(_config(files["sp"], 342)) == tk.load_file(files["sp"]).special
  assert tk.special_ids(_config("bpe:400", 400, mask_token_id=9)).mask == 9


def test_a_trained_bpe_is_saved_in_the_workdir_and_read_back(tmp_path):
  config = _config("bpe:300", 300)
  config.training.workdir = str(tmp_path)
  calls = []
  texts = lambda: calls.append(1) or CORPUS
  first = tk.load_tokenizer(config, texts, log=lambda m: None)
  assert (tmp_path / tk.TOKENIZER_FILE).exists() and calls == [1]
  again = tk.load_tokenizer(config, texts)   # on resume: read, not trained again
  assert calls == [1] and again.fingerprint == first.fingerprint
  assert again.encode(TEXT).tolist() == first.encode(TEXT).tolist()
  other = _config("bpe:290", 300)
  other.training.workdir = str(tmp_path)
  with pytest.raises(ConfigError, match="holds a tokenizer of 300 ids"):
    tk.load_tokenizer(other, texts)
  elsewhere = _config("bpe:300", 300)
  elsewhere.training.workdir = str(tmp_path / "none")
  with pytest.raises(ConfigError, match="no trained tokenizer"):
    tk.load_tokenizer(elsewhere)   # eval or sample before any training


def test_model_vocab_size_must_fit_the_tokenizer(files):
  with pytest.raises(ConfigError, match=r"model.vocab_size=341: .* has 342 ids; allowed: at "
                                        r"least 342"):
    tk.load_tokenizer(_config(files["sp"], 341))
  assert tk.load_tokenizer(_config(files["sp"], 360)).vocab_size == 342   # more is fine


@pytest.mark.parametrize("name, needle", [
    ("bpe:12", r"'bpe:12': allowed: .*'bpe:N' \(N >= 260\)"),
    ("words", r"'words': allowed: 'bytes', 'bpe:N'"),
    ("/nowhere/tokenizer.json", "'/nowhere/tokenizer.json': allowed: .*an existing"),
])
def test_bad_tokenizer_names_are_refused_by_validation(name, needle):
  c = default_config()
  c.data.tokenizer = name
  with pytest.raises(ConfigError, match=f"data.tokenizer={needle}"):
    validate(c)


@pytest.mark.parametrize("content, needle", [
    (b"", "the file is empty"),
    (b"{not json", "not a readable tokenizer.json"),
])
def test_empty_or_corrupt_tokenizer_files_are_named(tmp_path, content, needle):
  path = tmp_path / "tokenizer.json"
  path.write_bytes(content)
  with pytest.raises(ConfigError, match=f"data.tokenizer='{path}': {needle}"):
    tk.load_file(str(path))
  bad_sp = tmp_path / "bad.model"
  bad_sp.write_bytes(b"not a model")
  with pytest.raises(ConfigError, match=f"data.tokenizer='{bad_sp}': not a readable SentencePiece"):
    tk.load_file(str(bad_sp))


def test_a_bad_tokenizer_exits_2_from_the_cli(tmp_path, capsys):
  from stackwise_jax.cli import main
  path = tmp_path / "tokenizer.json"
  path.write_bytes(b"")
  code = main(["train", "--config", "configs/tiny.py", "--workdir", str(tmp_path / "run"),
               f"--config.data.tokenizer={path}"])
  assert code == 2 and "the file is empty" in capsys.readouterr().err
  assert not (tmp_path / "run").exists()


def test_mlm_masks_with_the_bpe_mask_token_and_leaves_its_pad_out_of_the_loss(bpe):
  config = _config("bpe:400", 400, training_objective="mlm", time_interpretation="input")
  masking = TimeStepMasking(config)
  assert (masking.mask_token_id, masking.pad_id) == (bpe.special.mask, bpe.special.pad) == (1, 0)
  ids = bpe.encode(CORPUS[3])[:16]
  tokens = np.stack([ids, np.where(np.arange(16) < 12, ids, bpe.special.pad)]).astype(np.int32)
  batch = {"tokens": jnp.asarray(tokens), "example_id": jnp.array([0, 1])}
  example = masking.example(batch, jnp.full(2, config.training.progressive.num_time_steps - 1))
  inputs, loss_mask = np.asarray(example["inputs"]), np.asarray(example["loss_mask"])
  np.testing.assert_array_equal(inputs, np.full((2, 16), 1))   # the top step masks everything
  np.testing.assert_array_equal(loss_mask, (tokens != 0).astype(np.float32))
  np.testing.assert_array_equal(example["targets"], tokens)


@pytest.mark.parametrize("objective", ["clm", "mlm"])
def test_sampling_chooses_only_ordinary_bpe_tokens_and_decodes_to_text(bpe, objective):
  from stackwise_jax.sample import complete, prompt_batch
  config = _config("bpe:400", 400, training_objective=objective, time_interpretation="input",
                   target_stacks=1)
  config.model.d_model, config.model.n_heads, config.model.n_kv_heads = 32, 2, 2
  config.model.d_ff = 64
  builder = ProgressiveRackBuilder(config)
  builder.add_stack()
  rack = builder.build_rack()
  prompt = "the quick brown"
  batch = prompt_batch(config, prompt=prompt, max_new_tokens=6, tokenizer=bpe, temperature=1.0)
  np.testing.assert_array_equal(batch[0, :len(bpe.encode(prompt))], bpe.encode(prompt))
  if objective == "mlm":
    assert (batch[0, -6:] == bpe.special.mask).all()
  rows = complete(rack, batch, 6, temperature=1.0, seed=3)
  new = rows[:, -6:]
  assert ((new >= 4) & (new < 400)).all()   # never a special id, never past the tokenizer
  text = bpe.decode(rows[0])
  assert text.startswith(prompt) and len(text) > len(prompt)
  assert bpe.encode(text[len(prompt):]).size > 0
  # even where the special ids have by far the largest logits, none is chosen
  import jax
  from stackwise_jax.sample import pick
  logits = jnp.zeros((64, 400)).at[:, :4].set(50.0).at[:, 399].set(1.0)
  choices = tk.sampled_ids(config)
  assert choices == (400, (0, 1, 2, 3))
  assert (pick(logits, jax.random.key(0), 0.0, 0, choices) == 399).all()
  drawn = pick(logits, jax.random.key(0), 1.0, 0, choices)
  assert ((drawn >= 4) & (drawn < 400)).all()


def test_an_export_carries_the_tokenizer_file(bpe, tmp_path):
  from stackwise_jax.export import export_rack
  config = _config("bpe:400", 400, target_stacks=1)
  config.model.d_model, config.model.n_heads, config.model.n_kv_heads = 32, 2, 2
  config.model.d_ff = 64
  builder = ProgressiveRackBuilder(config)
  builder.add_stack()
  export_rack(builder.build_rack(), 1, str(tmp_path), "npz", bpe)
  import json
  manifest = json.loads((tmp_path / "manifest.json").read_text())
  loaded = tk.load_file(str(pathlib.Path(tmp_path, manifest["tokenizer"])))
  assert loaded.fingerprint == bpe.fingerprint


def test_a_bpe_run_trains_samples_text_and_exports_its_tokenizer(text_corpus, tmp_path, capsys):
  """The CLI end to end with data.tokenizer='bpe:300': trained on the train split and saved in
  the workdir, reused by sample (which prints text) and copied by export."""
  from stackwise_jax.cli import main
  run = tmp_path / "run"
  bpe_args = ["--config.data.tokenizer=bpe:300", "--config.model.vocab_size=300"]
  assert main([*micro_args(text_corpus, run), *bpe_args]) == 0
  saved = tk.load_file(str(run / tk.TOKENIZER_FILE))
  assert saved.vocab_size <= 300 and saved.special == tk.SpecialIds(0, 1, 2, 3)
  results = (run / "results.json").read_text()
  assert '"final_eval_bits_per_byte"' in results
  capsys.readouterr()
  assert main(["sample", "--workdir", str(run), "--prompt", "the quick", "--max-new-tokens", "8",
               "--temperature", "1.0"]) == 0
  out = capsys.readouterr().out.strip()
  assert out.startswith("the quick") and len(out) > len("the quick")
  assert main(["export", "--workdir", str(run), "--format", "npz"]) == 0
  exported = tk.load_file(str(run / "export" / tk.TOKENIZER_FILE))
  assert exported.fingerprint == saved.fingerprint

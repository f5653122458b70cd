"""Data package (design §10): byte tokens, corpus files, the held-out split and grain pipelines."""
import os
import pathlib
import re
import sysconfig

import jax
import numpy as np
import pytest

from stackwise_jax.config import default_config
from stackwise_jax.data import (BOS_ID, EOS_ID, MASK_ID, PAD_ID, VOCAB_SIZE, DataLoader, decode,
                                encode, make_dataloader)
from stackwise_jax.data import corpus
from stackwise_jax.data.tokenizer import special_ids
from stackwise_jax.progressive import TimeStepMasking

SEQ_LEN, BATCH = 16, 4


def _write_corpus(root: pathlib.Path, n_files: int = 12) -> str:
  """Writes n_files small documents (some in a subdirectory, some non-ASCII); returns a ** glob."""
  for i in range(n_files):
    path = root / ("sub" if i % 3 == 0 else "") / f"doc{i:02d}.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    words = [f"w{i}_{j}" for j in range(40 + 13 * i)] + ["héllo", "✓"]
    path.write_text(" ".join(words) + f"\nend of document {i}\n", encoding="utf-8")
  return str(root / "**" / "*.txt")


def _config(pattern: str, **data):
  c = default_config()
  c.data.source, c.data.paths, c.data.val_fraction = "text", (pattern,), 0.25
  c.training.seq_len, c.training.batch_size = SEQ_LEN, BATCH
  for key, value in data.items():
    c.data[key] = value
  return c


def _reference_stream(files) -> list[int]:
  """The packed token stream rebuilt from the files with plain Python: bytes, then EOS per file."""
  stream = []
  for f in files:
    stream.extend(pathlib.Path(f).read_bytes())
    stream.append(EOS_ID)
  return stream


def _take(it, n):
  return [next(it) for _ in range(n)]


def _same_batches(a, b) -> bool:
  return len(a) == len(b) and all(
      np.array_equal(x["tokens"], y["tokens"]) and np.array_equal(x["example_id"], y["example_id"])
      for x, y in zip(a, b, strict=True))


@pytest.fixture
def pattern(tmp_path):
  return _write_corpus(tmp_path)


@pytest.fixture
def loader(pattern):
  return make_dataloader(_config(pattern))


# --- Tokens. ---


def test_encode_decode_round_trip_and_specials_skipped():
  text = "def f(x):\n  return 'héllo ✓'\n"
  ids = encode(text)
  assert ids.dtype == np.int32
  assert ids.tolist() == list(text.encode("utf-8"))
  assert encode(text.encode("utf-8")).tolist() == ids.tolist()
  with_specials = np.concatenate([[BOS_ID], ids[:10], [MASK_ID, PAD_ID], ids[10:], [EOS_ID]])
  assert decode(with_specials) == text
  assert decode(ids[:-3]).endswith("\ufffd")   # a cut multi-byte character is replaced, not raised


def test_special_ids_match_config_defaults():
  c = default_config()
  assert sorted({PAD_ID, MASK_ID, BOS_ID, EOS_ID}) == [256, 257, 258, 259]
  assert VOCAB_SIZE == c.model.vocab_size == 260
  assert c.training.progressive.mask_token_id is None   # None: the tokenizer's, MASK_ID here
  assert special_ids(c).mask == MASK_ID


def test_masked_inputs_carry_a_configured_mask_token_id(loader, pattern):
  """mask_token_id=3 (not MASK_ID): the masked inputs of real batches hold 3 exactly where the
  documented rule masks (design §7), recomputed here in NumPy from the per-example uniforms."""
  c = _config(pattern)
  p = c.training.progressive
  p.training_objective, p.time_interpretation, p.mask_token_id = "mlm", "input", 3
  c.training.seed = 4
  batch = next(loader.train_iter())
  ex = TimeStepMasking(c).generate_masks_for_stack(batch, 0, salt=0)
  tokens, steps = batch["tokens"], np.asarray(ex["time_step"])
  assert not (tokens == 3).any() and len(set(steps.tolist())) > 1
  expected = tokens.copy()
  for row, (example_id, t) in enumerate(zip(batch["example_id"], steps)):
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(4), example_id), t)
    u = np.asarray(jax.random.uniform(key, (SEQ_LEN,)))
    ratio = p.mlm_min_ratio + (1 - p.mlm_min_ratio) * t / (p.num_time_steps - 1)
    masked = u < ratio
    masked[np.argmin(u)] = True   # every example has a masked position
    expected[row, masked] = 3
  np.testing.assert_array_equal(ex["inputs"], expected)
  assert not (np.asarray(ex["inputs"]) == MASK_ID).any()


# --- Corpus files and the split. ---


def test_builtin_corpus_is_sorted_stdlib_sources():
  root = pathlib.Path(sysconfig.get_paths()["stdlib"])
  files = corpus.builtin_corpus_files()
  assert len(files) > 100
  assert all(f.suffix == ".py" for f in files)
  rel = [f.relative_to(root) for f in files]
  assert not any(part in ("site-packages", "dist-packages") for r in rel for part in r.parts)
  assert [r.as_posix() for r in rel] == sorted(r.as_posix() for r in rel)
  assert root / "os.py" in files
  assert corpus.builtin_corpus_files() == files


def test_text_files_expands_globs_dedups_and_sorts(pattern, tmp_path):
  files = corpus.text_files([pattern, str(tmp_path / "doc01.txt"), str(tmp_path / "*.txt")])
  assert len(files) == 12
  assert len({os.path.abspath(f) for f in files}) == 12
  assert [os.path.abspath(f) for f in files] == sorted(os.path.abspath(f) for f in files)
  assert tmp_path / "sub" / "doc00.txt" in files   # ** reached the subdirectory


@pytest.mark.parametrize("paths", [("{root}/nothing/*.txt",), ("{root}/missing.txt",), ()])
def test_missing_files_raise_naming_data_paths(tmp_path, paths):
  paths = tuple(p.format(root=tmp_path) for p in paths)
  with pytest.raises(ValueError, match="data.paths") as e:
    c = _config("unused")
    c.data.paths = paths
    make_dataloader(c)
  for p in paths:
    assert p in str(e.value)


def test_split_is_deterministic_disjoint_and_near_val_fraction(tmp_path):
  files = [tmp_path / f"d{i // 10}" / f"f{i}.txt" for i in range(400)]
  train, val = corpus.split_files(files, 0.2)
  assert not set(train) & set(val)
  assert sorted(train + val) == sorted(files)
  assert 0.15 < len(val) / len(files) < 0.25
  assert corpus.split_files(files, 0.2) == (train, val)
  # The split follows relative paths, not where the corpus lives or Python's salted hash().
  moved = [pathlib.Path("/elsewhere/corpus") / f.relative_to(tmp_path) for f in files]
  _, moved_val = corpus.split_files(moved, 0.2)
  assert [f.relative_to("/elsewhere/corpus") for f in moved_val] == [
      f.relative_to(tmp_path) for f in val]
  # A file keeps its side when others are added.
  _, val_half = corpus.split_files(files[:200], 0.2)
  assert set(val_half) == set(val) & set(files[:200])


@pytest.mark.parametrize("val_fraction", [0.001, 0.999])
def test_split_keeps_a_file_on_each_side(tmp_path, val_fraction):
  train, val = corpus.split_files([tmp_path / "a.txt", tmp_path / "b.txt"], val_fraction)
  assert len(train) == 1 and len(val) == 1 and train != val


def test_loader_split_has_no_train_file_in_val(loader):
  assert loader.train_files and loader.val_files
  assert not set(loader.train_files) & set(loader.val_files)
  assert loader.num_files == len(loader.train_files) + len(loader.val_files) == 12


def test_single_file_is_split_by_its_last_tokens(tmp_path):
  path = tmp_path / "one.txt"
  path.write_bytes(bytes(range(32, 127)) * 40)
  dl = make_dataloader(_config(str(path), val_fraction=0.1))
  stream = _reference_stream([path])
  n_val = round(0.1 * len(stream))
  assert dl.val_tokens == n_val and dl.train_tokens == len(stream) - n_val
  assert dl.train_files == dl.val_files == [path]
  first = dl.eval_batches(1)[0]
  start = len(stream) - n_val
  for j in range(BATCH):
    assert first["tokens"][j].tolist() == stream[start + j * SEQ_LEN:start + (j + 1) * SEQ_LEN]


# --- Packing and batches. ---


def test_train_batches_shape_dtype_and_range(loader):
  for batch in _take(loader.train_iter(), 5):
    assert batch["tokens"].shape == (BATCH, SEQ_LEN) and batch["tokens"].dtype == np.int32
    assert batch["example_id"].shape == (BATCH,) and batch["example_id"].dtype == np.int32
    assert 0 <= batch["tokens"].min() and batch["tokens"].max() < VOCAB_SIZE


def test_records_are_the_packed_stream_and_ids_index_them(loader):
  stream = _reference_stream(loader.train_files)
  n = len(stream) // SEQ_LEN
  assert loader.train_tokens == len(stream) and loader.num_train_records == n
  # One epoch of positions: the first n records drawn are a permutation of all n records.
  batches = _take(loader.train_iter(), -(-n // BATCH))
  ids = np.concatenate([b["example_id"] for b in batches])
  rows = np.concatenate([b["tokens"] for b in batches])
  assert sorted(ids[:n].tolist()) == list(range(n))
  for i, row in zip(ids, rows):
    assert row.tolist() == stream[i * SEQ_LEN:(i + 1) * SEQ_LEN]
  # In example-id order the records decode to the files joined with EOS, tail dropped.
  by_id = dict(zip(ids.tolist(), rows))
  flat = np.concatenate([by_id[i] for i in range(n)])
  assert flat.tolist() == stream[:n * SEQ_LEN]
  texts = [pathlib.Path(f).read_text(encoding="utf-8") for f in loader.train_files]
  ends = np.flatnonzero(flat == EOS_ID)
  docs = [decode(flat[start:end]) for start, end in zip(np.r_[0, ends[:-1] + 1], ends)]
  assert len(docs) >= len(texts) - 1   # the dropped tail (< seq_len) cuts at most the last one
  assert docs == texts[:len(docs)]


def test_epochs_are_reshuffled_permutations(tmp_path):
  (tmp_path / "a.txt").write_bytes(b"a" * 40 * SEQ_LEN)
  (tmp_path / "b.txt").write_bytes(b"b" * 40 * SEQ_LEN)
  dl = make_dataloader(_config(str(tmp_path / "*.txt"), val_fraction=0.5))
  n = dl.num_train_records
  ids = np.concatenate([b["example_id"] for b in _take(dl.train_iter(), 3 * n // BATCH)])
  epochs = [ids[e * n:(e + 1) * n].tolist() for e in range(3)]
  assert all(sorted(e) == list(range(n)) for e in epochs)
  assert epochs[0] != epochs[1] and epochs[1] != epochs[2]


def test_too_little_data_raises_naming_the_field(pattern):
  with pytest.raises(ValueError, match="training.batch_size"):
    c = _config(pattern)
    c.training.batch_size = 10_000
    make_dataloader(c)
  with pytest.raises(ValueError, match="data.val_fraction"):
    c = _config(pattern, val_fraction=0.01)
    c.training.seq_len = 4096
    c.training.batch_size = 1
    make_dataloader(c)


# --- Order, seeds and checkpointable state. ---


@pytest.mark.parametrize("k", [3, 130])   # 130 batches cross into the second epoch
def test_restored_iterator_yields_the_same_following_batches(loader, k):
  it = loader.train_iter()
  _take(it, k)
  state = it.get_state()
  expected = _take(it, 8)
  restored = loader.train_iter()
  restored.set_state(state)
  assert _same_batches(_take(restored, 8), expected)
  assert not _same_batches(_take(loader.train_iter(), 8), expected)   # state did matter


def test_shuffle_seed_fixes_the_batch_sequence(pattern):
  first = _take(make_dataloader(_config(pattern, shuffle_seed=7)).train_iter(), 6)
  again = _take(make_dataloader(_config(pattern, shuffle_seed=7)).train_iter(), 6)
  other = _take(make_dataloader(_config(pattern, shuffle_seed=8)).train_iter(), 6)
  assert _same_batches(first, again)
  assert not _same_batches(first, other)


def test_eval_batches_are_fixed_val_records_in_order(loader):
  stream = _reference_stream(loader.val_files)
  n_val = loader.num_val_records
  n = -(-n_val // BATCH) + 2   # enough to cycle past the end of the val split
  batches = loader.eval_batches(n)
  assert len(batches) == n and _same_batches(batches, loader.eval_batches(n))
  ids = np.concatenate([b["example_id"] for b in batches])
  assert ids.tolist() == [i % n_val for i in range(n * BATCH)]
  for i, row in zip(ids, np.concatenate([b["tokens"] for b in batches])):
    assert row.tolist() == stream[i * SEQ_LEN:(i + 1) * SEQ_LEN]
  # Words "w{i}_{j}" name their document: eval text comes from val documents only.
  seen = {int(i) for i in re.findall(r"w(\d+)_", decode(np.concatenate([b["tokens"] for b in batches])))}
  assert seen and seen <= {int(f.stem[3:]) for f in loader.val_files}
  assert loader.eval_batches(0) == [] and loader.eval_batches(-1) == []


def test_host_shares_put_together_are_the_single_host_batches(pattern):
  files = corpus.text_files([pattern])
  kwargs = dict(seq_len=SEQ_LEN, val_fraction=0.25)
  whole = DataLoader(files, batch_size=2 * BATCH, **kwargs)
  shards = [DataLoader(files, batch_size=BATCH, shard_index=s, shard_count=2, **kwargs)
            for s in range(2)]
  steps = 2 * whole.num_train_records // (2 * BATCH)   # two epochs
  batches = [_take(dl.train_iter(), steps) for dl in shards]
  for k, expected in enumerate(_take(whole.train_iter(), steps)):
    for key in ("tokens", "example_id"):
      np.testing.assert_array_equal(
          np.concatenate([batches[0][k][key], batches[1][k][key]]), expected[key])
  evals = [dl.eval_batches(3) for dl in shards]
  for k, expected in enumerate(whole.eval_batches(3)):
    np.testing.assert_array_equal(np.concatenate([evals[0][k]["tokens"], evals[1][k]["tokens"]]),
                                  expected["tokens"])
  assert not set(batches[0][0]["example_id"]) & set(batches[1][0]["example_id"])


# --- The built-in corpus end to end (reads ~30 MB once). ---


def test_builtin_loader_packs_the_whole_stdlib():
  c = default_config()
  c.training.seq_len, c.training.batch_size = 64, 8
  dl = make_dataloader(c)
  files = dl.train_files + dl.val_files
  assert sorted(files) == sorted(corpus.builtin_corpus_files())
  assert dl.train_tokens == sum(f.stat().st_size + 1 for f in dl.train_files)
  assert dl.num_train_records == dl.train_tokens // 64
  assert 0.02 < len(dl.val_files) / len(files) < 0.08   # val_fraction 0.05
  batch = next(dl.train_iter())
  assert batch["tokens"].shape == (8, 64) and batch["tokens"].max() < VOCAB_SIZE
  assert "builtin" in dl.describe() and f"{dl.num_train_records:,}" in dl.describe()

"""Data sources (design §10): jsonl, parquet and `datasets` directories read as documents, bad rows
refused or counted, and `prepare`'s ArrayRecord shards giving the text pipeline's batches."""
import json
import pathlib

import numpy as np
import pytest

from conftest import REPO, cut_copy, micro_config
from stackwise_jax.checkpoint import RunCheckpoints
from stackwise_jax.cli import main
from stackwise_jax.config import default_config
from stackwise_jax.errors import ConfigError
from stackwise_jax.data import EOS_ID, make_dataloader
from stackwise_jax.data import prepared
from stackwise_jax.data.prepared import prepare
from stackwise_jax.progressive import ProgressiveRackBuilder, ProgressiveTrainer

SEQ_LEN, BATCH = 16, 4
DOCS = [" ".join(f"w{i}_{j}" for j in range(30 + 9 * i)) + f"\nhéllo ✓ end of {i}\n"
        for i in range(10)]


def _write_text(root: pathlib.Path, docs=DOCS) -> str:
  """One file per document, named by its position: the text split (by a hash of each file's
  relative path) then equals the row sources' split (by a hash of str(position))."""
  root.mkdir(parents=True, exist_ok=True)
  for i, doc in enumerate(docs):
    (root / str(i)).write_text(doc, encoding="utf-8")
  return str(root / "*")


def _write_jsonl(path: pathlib.Path, lines) -> str:
  path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
  return str(path)


def _jsonl_lines(docs=DOCS, field="text"):
  return [json.dumps({"id": i, field: doc}) for i, doc in enumerate(docs)]


def _write_source(kind: str, root: pathlib.Path, docs=DOCS) -> str:
  root.mkdir(parents=True, exist_ok=True)
  if kind == "text":
    return _write_text(root / "text", docs)
  if kind == "jsonl":
    return _write_jsonl(root / "docs.jsonl", _jsonl_lines(docs))
  if kind == "parquet":
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"id": list(range(len(docs))), "text": docs}), root / "docs.parquet")
    return str(root / "docs.parquet")
  import datasets
  datasets.Dataset.from_dict({"id": list(range(len(docs))), "text": docs}).save_to_disk(
      str(root / "hf"))
  return str(root / "hf")


def _config(source: str, path: str, **data):
  c = default_config()
  c.data.source, c.data.paths, c.data.val_fraction = source, (path,), 0.3
  c.training.seq_len, c.training.batch_size = SEQ_LEN, BATCH
  for key, value in data.items():
    c.data[key] = value
  if c.data.tokenizer != "bytes":
    c.model.vocab_size = 300
  return c


def _take(it, n):
  return [next(it) for _ in range(n)]


def _assert_same_batches(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b, strict=True):
    np.testing.assert_array_equal(x["tokens"], y["tokens"])
    np.testing.assert_array_equal(x["example_id"], y["example_id"])


def _assert_same_data(a, b, steps=60):
  """Same counts, the same train batches (past the first epoch) and the same eval batches."""
  assert (a.num_train_records, a.num_val_records) == (b.num_train_records, b.num_val_records)
  assert steps * BATCH > a.num_train_records
  _assert_same_batches(_take(a.train_iter(), steps), _take(b.train_iter(), steps))
  _assert_same_batches(a.eval_batches(5), b.eval_batches(5))


def _stream(docs, encode, eos) -> list[int]:
  """The packed stream rebuilt in plain Python: each document's ids, then EOS."""
  return [t for doc in docs for t in [*encode(doc), eos]]


def _assert_val_is(loader, docs, encode, eos):
  """Eval batches are the val documents' stream cut into records, in order."""
  stream = _stream(docs, encode, eos)
  rows = np.concatenate([b["tokens"] for b in loader.eval_batches(2)])
  for i, row in enumerate(rows):
    assert row.tolist() == stream[i * SEQ_LEN:(i + 1) * SEQ_LEN]


# --- Row sources: the documents of text files. ---


@pytest.mark.parametrize("kind", ["jsonl", "parquet", "hf_disk"])
def test_row_sources_give_the_records_of_text_files_with_the_same_documents(tmp_path, kind):
  text = make_dataloader(_config("text", _write_source("text", tmp_path)))
  rows = make_dataloader(_config(kind, _write_source(kind, tmp_path)))
  _assert_same_data(text, rows)
  val = [DOCS[int(pathlib.Path(f).name)] for f in text.val_files]
  assert rows.val_documents == len(val) and rows.train_documents == len(DOCS) - len(val)
  _assert_val_is(rows, val, lambda d: d.encode("utf-8"), EOS_ID)
  assert kind in rows.describe() and rows.skipped == {"bad": 0, "empty": 0}


def test_a_trained_bpe_flows_through_the_row_sources(tmp_path):
  text = make_dataloader(_config("text", _write_source("text", tmp_path), tokenizer="bpe:300"))
  rows = make_dataloader(_config("jsonl", _write_source("jsonl", tmp_path), tokenizer="bpe:300"))
  tok = rows.tokenizer
  assert tok.vocab_size == 300 and tok.fingerprint == text.tokenizer.fingerprint
  _assert_same_data(text, rows)
  val = [DOCS[int(pathlib.Path(f).name)] for f in text.val_files]
  _assert_val_is(rows, val, lambda d: tok.encode(d).tolist(), tok.special.eos)
  tokens = np.concatenate([b["tokens"] for b in _take(rows.train_iter(), 20)])
  assert tokens.max() >= 260 and tokens.max() < 300   # merged pieces, not bytes


def test_one_document_is_split_by_its_last_tokens(tmp_path):
  rows = make_dataloader(_config("jsonl", _write_jsonl(tmp_path / "one.jsonl",
                                                       _jsonl_lines([DOCS[9] * 3]))))
  stream = _stream([DOCS[9] * 3], lambda d: d.encode("utf-8"), EOS_ID)
  n_val = round(0.3 * len(stream))
  assert (rows.train_tokens, rows.val_tokens) == (len(stream) - n_val, n_val)
  assert rows.eval_batches(1)[0]["tokens"][0].tolist() == stream[-n_val:][:SEQ_LEN]
  assert "split by tokens" in rows.describe()


# --- Bad rows. ---

BAD_LINES = {"not JSON": '{"text": "cut', "no field": '{"title": "no text here"}',
             "not a string": '{"text": 42}', "not an object": '["text"]'}


@pytest.mark.parametrize("what", sorted(BAD_LINES))
def test_a_bad_jsonl_line_is_refused_naming_file_and_line(tmp_path, what):
  lines = _jsonl_lines()
  lines.insert(4, BAD_LINES[what])
  path = _write_jsonl(tmp_path / "docs.jsonl", lines)
  with pytest.raises(ConfigError, match="skip_bad_records") as e:
    make_dataloader(_config("jsonl", path))
  assert str(e.value).startswith(f"{path}:5: ")


def test_skip_bad_records_counts_them_and_keeps_the_good_rows(tmp_path):
  lines = _jsonl_lines()
  for k, bad in enumerate(BAD_LINES.values()):
    lines.insert(2 * k + 1, bad)
  lines.insert(3, "")   # a blank line is no row at all
  dirty = make_dataloader(_config("jsonl", _write_jsonl(tmp_path / "dirty.jsonl", lines),
                                  skip_bad_records=True))
  clean = make_dataloader(_config("jsonl", _write_source("jsonl", tmp_path)))
  assert dirty.skipped == {"bad": len(BAD_LINES), "empty": 0}
  assert f"skipped {len(BAD_LINES)} bad rows" in dirty.describe()
  _assert_same_data(dirty, clean)


def test_empty_texts_are_counted_and_skipped(tmp_path):
  lines = _jsonl_lines()
  lines[2:2] = [json.dumps({"text": ""})] * 3
  with_empty = make_dataloader(_config("jsonl", _write_jsonl(tmp_path / "e.jsonl", lines)))
  assert with_empty.skipped == {"bad": 0, "empty": 3}
  assert "skipped 3 empty rows" in with_empty.describe()
  _assert_same_data(with_empty, make_dataloader(_config("jsonl", _write_source("jsonl", tmp_path))))


def test_a_parquet_file_without_the_text_field_names_its_columns(tmp_path):
  path = _write_source("parquet", tmp_path)
  with pytest.raises(ConfigError, match="data.text_field='body'") as e:
    make_dataloader(_config("parquet", path, text_field="body"))
  assert path in str(e.value) and "id, text" in str(e.value)
  body = make_dataloader(_config("jsonl", _write_jsonl(tmp_path / "b.jsonl",
                                                       _jsonl_lines(field="body")),
                                 text_field="body"))
  _assert_same_data(body, make_dataloader(_config("parquet", path)))


# --- prepare and the array_record source. ---


def _prepare(config, out: pathlib.Path) -> int:
  """`stackwise-jax prepare` with `config`'s data and seq_len as overrides."""
  d = config.data
  return main(["prepare", "--config", str(REPO / "configs/tiny.py"), "--out", str(out),
               "--no-progress", f"--config.data.source={d.source}",
               f"--config.data.paths=('{d.paths[0]}',)", f"--config.data.tokenizer={d.tokenizer}",
               f"--config.data.val_fraction={d.val_fraction}",
               f"--config.training.seq_len={config.training.seq_len}",
               f"--config.model.vocab_size={config.model.vocab_size}"])


def _prepared(config, out):
  c = _config("array_record", str(out), tokenizer=config.data.tokenizer)
  c.model.vocab_size = config.model.vocab_size
  return c


@pytest.mark.parametrize("source,tokenizer", [("text", "bytes"), ("jsonl", "bpe:300")])
def test_prepared_shards_give_the_batches_of_the_source(tmp_path, source, tokenizer):
  config = _config(source, _write_source(source, tmp_path), tokenizer=tokenizer)
  assert _prepare(config, tmp_path / "prepared") == 0
  original = make_dataloader(config)
  prepared = make_dataloader(_prepared(config, tmp_path / "prepared"))
  _assert_same_data(original, prepared)
  assert prepared.tokenizer.fingerprint == original.tokenizer.fingerprint
  assert (prepared.train_tokens, prepared.val_documents) == (original.train_tokens,
                                                             original.val_documents)
  manifest = json.loads((tmp_path / "prepared" / "manifest.json").read_text())
  assert manifest["record_length"] == SEQ_LEN and manifest["source"] == source
  assert manifest["tokenizer"]["fingerprint"] == original.tokenizer.fingerprint
  for split, n in (("train", original.num_train_records), ("val", original.num_val_records)):
    assert manifest["splits"][split]["records"] == n
    for shard in manifest["splits"][split]["shards"]:
      assert (tmp_path / "prepared" / shard).stat().st_size >= n * SEQ_LEN * 2 / len(
          manifest["splits"][split]["shards"])
  assert "array_record" in prepared.describe()


def test_records_spread_over_many_shards_read_back_in_order(tmp_path, monkeypatch):
  monkeypatch.setattr(prepared, "SHARD_BYTES", 50 * SEQ_LEN * 2)   # 50 records a shard
  config = _config("text", _write_source("text", tmp_path))
  manifest = prepare(config, str(tmp_path / "prepared"), progress=False)
  assert len(manifest["splits"]["train"]["shards"]) == -(-manifest["splits"]["train"]["records"] // 50) > 2
  _assert_same_data(make_dataloader(config), make_dataloader(_prepared(config, tmp_path / "prepared")))


def test_a_restored_array_record_iterator_continues_like_the_text_one(tmp_path):
  config = _config("text", _write_source("text", tmp_path))
  assert _prepare(config, tmp_path / "prepared") == 0
  text, prepared = make_dataloader(config), make_dataloader(_prepared(config, tmp_path / "prepared"))
  it = prepared.train_iter()
  _take(it, 37)   # into the second epoch
  state = it.get_state()
  expected = _take(it, 8)
  for loader in (prepared, text):   # the state is grain's: either pipeline resumes from it
    restored = loader.train_iter()
    restored.set_state(state)
    _assert_same_batches(_take(restored, 8), expected)
  with pytest.raises(AssertionError):
    _assert_same_batches(_take(prepared.train_iter(), 8), expected)


def _train(config, workdir):
  checkpoints = RunCheckpoints(str(workdir), config, log=lambda _: None)
  trainer = ProgressiveTrainer(config, progress=False, log=lambda _: None, checkpoints=checkpoints)
  results = trainer.train_progressively(ProgressiveRackBuilder(config), make_dataloader(config))
  checkpoints.close()
  return [s["losses"] for s in results["stages"]]


def test_a_run_from_prepared_shards_resumes_to_the_text_runs_losses(tmp_path):
  source = micro_config(target_stacks=1)
  source.data.source, source.data.paths = "text", (_write_source("text", tmp_path),)
  source.data.val_fraction = 0.3
  source.training.checkpoint_every, source.training.keep_checkpoints = 3, 100
  assert _prepare(source, tmp_path / "prepared") == 0
  config = micro_config(target_stacks=1)
  config.data.source, config.data.paths = "array_record", (str(tmp_path / "prepared"),)
  config.data.val_fraction = 0.3
  config.training.checkpoint_every, config.training.keep_checkpoints = 3, 100
  whole = _train(config, tmp_path / "whole")
  assert whole == _train(source, tmp_path / "text")
  cut_copy(tmp_path / "whole", tmp_path / "cut", 3)   # checkpoints at 3, 6, 8: resume from 3
  assert _train(config, tmp_path / "cut") == whole


@pytest.mark.parametrize("field,prepared_with,override,why", [
    ("training.seq_len", "bytes", "--config.training.seq_len=12", "records of 16 tokens"),
    ("data.tokenizer", "bpe:300", "--config.data.tokenizer=bytes",
     "prepared with the tokenizer 'bpe:300' (fingerprint"),
])
def test_a_manifest_that_does_not_match_the_config_exits_2_naming_the_field(
    tmp_path, capsys, field, prepared_with, override, why):
  config = _config("jsonl", _write_source("jsonl", tmp_path), tokenizer=prepared_with)
  assert _prepare(config, tmp_path / "prepared") == 0
  code = main(["train", "--config", str(REPO / "configs/tiny.py"), "--workdir",
               str(tmp_path / "run"), "--no-progress", "--config.data.source=array_record",
               f"--config.data.paths=('{tmp_path / 'prepared'}',)",
               "--config.data.val_fraction=0.3", "--config.training.seq_len=16",
               "--config.model.vocab_size=300", override])
  err = capsys.readouterr().err
  assert code == 2 and f"error: {field}=" in err and why in err


def test_another_bpe_than_the_prepared_one_is_refused(tmp_path):
  config = _config("jsonl", _write_source("jsonl", tmp_path), tokenizer="bpe:300")
  assert _prepare(config, tmp_path / "prepared") == 0
  # A workdir whose own BPE was trained on other text.
  other = _config("jsonl", _write_jsonl(tmp_path / "other.jsonl", _jsonl_lines([d.upper() for d in DOCS])),
                  tokenizer="bpe:300")
  other.training.workdir = str(tmp_path / "run")
  make_dataloader(other)
  resumed = _config("array_record", str(tmp_path / "prepared"), tokenizer="bpe:300")
  resumed.training.workdir = str(tmp_path / "run")
  with pytest.raises(ConfigError, match="data.tokenizer='bpe:300': .*fingerprint"):
    make_dataloader(resumed)
  # A fresh workdir gets the prepared BPE, for eval, sample and export.
  resumed.training.workdir = str(tmp_path / "fresh")
  assert make_dataloader(resumed).tokenizer.fingerprint == make_dataloader(config).tokenizer.fingerprint
  assert (tmp_path / "fresh" / "tokenizer.json").read_bytes() == (
      tmp_path / "prepared" / "tokenizer.json").read_bytes()


def test_prepare_refuses_a_prepared_directory_and_bad_rows(tmp_path, capsys):
  config = _config("text", _write_source("text", tmp_path))
  assert _prepare(config, tmp_path / "prepared") == 0
  assert _prepare(config, tmp_path / "prepared") == 2
  assert "already holds prepared data" in capsys.readouterr().err
  lines = _jsonl_lines()
  lines.insert(1, "{")
  bad = _config("jsonl", _write_jsonl(tmp_path / "bad.jsonl", lines))
  assert _prepare(bad, tmp_path / "bad") == 2
  assert "bad.jsonl:2: not a JSON line" in capsys.readouterr().err
  assert not (tmp_path / "bad" / "manifest.json").exists()

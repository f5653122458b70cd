"""Prepared data (design §10): `stackwise-jax prepare` tokenizes and packs a corpus once into
ArrayRecord shards; `data.source="array_record"` with `data.paths=(DIR,)` trains from them.

DIR holds, per split, `{split}-{k:05d}-of-{n:05d}.array_record` shards (each record one packed
record: seq_len tokens as little-endian uint16 or uint32 bytes, one record per chunk so a random
read decodes only it; read as a grain random-access source), `manifest.json` (written last: a prepare cut short leaves none), and for a
"bpe:N" tokenizer the `tokenizer.json` prepare trained. Records are written in example-id order,
so record i of a split (its shards in order) is record i of the text pipeline: the same shuffle,
batching and iterator state give the same batches.
"""
import copy
import json
import os
import shutil
import threading

import numpy as np
import tqdm

from stackwise_jax.data import tokenizer as tokenizers
from stackwise_jax.data.packing import Corpus, Split, build_corpus
from stackwise_jax.data.sources import DOCUMENT_SOURCES, PREPARED_SOURCES
from stackwise_jax.errors import ConfigError

MANIFEST = "manifest.json"
FORMAT = "stackwise-jax prepared records"
VERSION = 1
SHARD_BYTES = 64 << 20   # records per shard: as many as fit in this many bytes
WRITER_OPTIONS = "group_size:1,uncompressed"   # one record per chunk: random reads stay cheap
READER_OPTIONS = "readahead_buffer_size:0,max_parallelism:0"   # random access, in this thread


def prepare(config, out: str, progress: bool = True, log=print) -> dict:
  """Tokenizes and packs the corpus `config` names (as `make_dataloader` would) into shards in
  `out`; returns the manifest (also written to out/manifest.json).

  A "bpe:N" tokenizer is trained on the train split and saved to out/tokenizer.json.

  Raises:
    ConfigError (a ValueError): a mixture (data.mixture), a prepared source (array_record), `out`
      already prepared, or what `make_dataloader` refuses (bad rows, missing files, no val
      record).
  """
  data, seq_len = config.data, config.training.seq_len
  if data.mixture:
    raise ConfigError("data.mixture: prepare writes the records of one source; allowed: () here "
                      "(prepare each source on its own, then list the prepared directories as "
                      "array_record entries of data.mixture)")
  if data.source in PREPARED_SOURCES:
    raise ConfigError(f"data.source={data.source!r}: that data is prepared already; allowed: a "
                      f"source of documents ({', '.join(DOCUMENT_SOURCES)})")
  if os.path.exists(os.path.join(out, MANIFEST)):
    raise ConfigError(f"--out {out}: already holds prepared data ({MANIFEST}); allowed: a new "
                      "or empty directory")
  os.makedirs(out, exist_ok=True)
  config = copy.deepcopy(config)
  config.training.workdir = out   # where a "bpe:N" tokenizer is trained to and read back from
  packed = build_corpus(config, progress=progress, log=log)
  for name, split in (("train", packed.train), ("val", packed.val)):
    if len(split.records) == 0:
      raise ConfigError(f"data.val_fraction={data.val_fraction!r}: the {name} split "
                        f"({split.documents} documents, {split.tokens} tokens) holds no record of "
                        f"training.seq_len={seq_len} tokens; allowed: another fraction, more data, "
                        "or a shorter seq_len")
  dtype = packed.train.records.dtype.newbyteorder("<")
  per_shard = max(1, SHARD_BYTES // (seq_len * dtype.itemsize))
  splits = {}
  for name, split in (("train", packed.train), ("val", packed.val)):
    n = len(split.records)
    count = -(-n // per_shard)
    shards = [f"{name}-{k:05d}-of-{count:05d}.array_record" for k in range(count)]
    with tqdm.tqdm(total=n, desc=f"writing {name}", unit="record", disable=not progress,
                   leave=False) as bar:
      for k, shard in enumerate(shards):
        _write(os.path.join(out, shard), split.records[k * per_shard:(k + 1) * per_shard], dtype)
        bar.update(min(per_shard, n - k * per_shard))
    splits[name] = {"records": n, "tokens": split.tokens, "documents": split.documents,
                    "shards": shards}
  tok = packed.tokenizer
  manifest = {
      "format": FORMAT, "version": VERSION,
      "tokenizer": {"name": tok.name, "fingerprint": tok.fingerprint, "vocab_size": tok.vocab_size},
      "record_length": seq_len, "dtype": dtype.str,
      "source": data.source, "paths": list(data.paths), "text_field": data.text_field,
      "val_fraction": data.val_fraction, "split_by_tokens": packed.by_tokens,
      "input_bytes": _input_bytes(packed), "skipped": packed.skipped, "splits": splits}
  temporary = os.path.join(out, MANIFEST + ".tmp")
  with open(temporary, "w") as f:
    json.dump(manifest, f, indent=2)
  os.replace(temporary, os.path.join(out, MANIFEST))
  return manifest


def _write(path: str, records: np.ndarray, dtype: np.dtype) -> None:
  from array_record.python.array_record_module import ArrayRecordWriter
  writer = ArrayRecordWriter(path, WRITER_OPTIONS)
  try:
    for record in records.astype(dtype, copy=False):
      writer.write(record.tobytes())
  finally:
    writer.close()


def _input_bytes(packed: Corpus) -> int:
  """Bytes of the files the corpus was read from (a directory: of every file under it)."""
  total = 0
  for path in {str(f) for f in packed.train.files + packed.val.files}:
    if os.path.isdir(path):
      total += sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)
    else:
      total += os.path.getsize(path)
  return total


def read_manifest(directory: str) -> dict:
  """The manifest of a directory `prepare` wrote; a ConfigError naming data.paths if none."""
  path = os.path.join(directory, MANIFEST)
  try:
    with open(path) as f:
      manifest = json.load(f)
  except FileNotFoundError:
    raise ConfigError(f"data.paths: {directory!r} holds no {MANIFEST}; allowed: a directory "
                      "written by `stackwise-jax prepare`") from None
  except ValueError as e:
    raise ConfigError(f"data.paths: {path}: not valid JSON ({e})") from None
  if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
    raise ConfigError(f"data.paths: {path}: not a manifest of `stackwise-jax prepare`")
  if manifest.get("version") != VERSION:
    raise ConfigError(f"data.paths: {path}: version {manifest.get('version')!r}; allowed: "
                      f"{VERSION} (prepare the data again with this version)")
  return manifest


class _Shards:
  """Random access to one split's prepared records: item i is record i, [seq_len] tokens.

  Readers are opened without readahead or a thread pool and read by seek + read: ~7 µs a record
  on a 2-core CPU, where grain's ArrayRecordDataSource (a parallel batched read per item) takes
  ~400 µs. Pickled (for grain's worker processes) as its paths; each process opens its own."""

  def __init__(self, paths: list[str], dtype: str):
    self._paths, self._dtype = list(paths), np.dtype(dtype)
    self._open()

  def _open(self) -> None:
    from array_record.python.array_record_module import ArrayRecordReader
    self._readers = [ArrayRecordReader(p, READER_OPTIONS) for p in self._paths]
    self._starts = np.cumsum([0] + [r.num_records() for r in self._readers])
    self._lock = threading.Lock()   # seek + read is one step

  def __len__(self) -> int:
    return int(self._starts[-1])

  def __getitem__(self, index: int) -> np.ndarray:
    shard = int(np.searchsorted(self._starts, index, side="right")) - 1
    with self._lock:
      reader = self._readers[shard]
      reader.seek(int(index - self._starts[shard]))
      data = reader.read()
    return np.frombuffer(data, self._dtype)

  def __getstate__(self):
    return {"paths": self._paths, "dtype": self._dtype.str}

  def __setstate__(self, state):
    self._paths, self._dtype = state["paths"], np.dtype(state["dtype"])
    self._open()


def open_corpus(config, log=print) -> Corpus:
  """The prepared corpus in `config.data.paths[0]`, checked against the config.

  Raises:
    ConfigError (a ValueError) naming the field that differs from the manifest:
      training.seq_len (its record_length), data.tokenizer (its fingerprint), data.val_fraction;
      or data.paths for a missing manifest or shard.
  """
  directory = config.data.paths[0]
  manifest = read_manifest(directory)
  seq_len, length = config.training.seq_len, manifest["record_length"]
  if seq_len != length:
    raise ConfigError(f"training.seq_len={seq_len}: {directory} was prepared with records of "
                      f"{length} tokens ({MANIFEST} record_length); allowed: {length}, or prepare "
                      f"again with training.seq_len={seq_len}")
  tok = _tokenizer(config, directory, manifest, log)
  theirs = manifest["tokenizer"]
  if tok.fingerprint != theirs["fingerprint"]:
    raise _tokenizer_differs(config, directory, theirs,
                             f"fingerprint {theirs['fingerprint'][:12]}…, this one's "
                             f"{tok.fingerprint[:12]}…")
  if config.data.val_fraction != manifest["val_fraction"]:
    raise ConfigError(f"data.val_fraction={config.data.val_fraction!r}: {directory} was prepared "
                      f"with data.val_fraction={manifest['val_fraction']!r} ({MANIFEST}); allowed: "
                      "that fraction, or prepare again")
  splits = []
  for name in ("train", "val"):
    entry = manifest["splits"][name]
    paths = [os.path.join(directory, shard) for shard in entry["shards"]]
    for path in paths:
      if not os.path.isfile(path):
        raise ConfigError(f"data.paths: {directory!r}: the shard {path} is missing; prepare again")
    records = _Shards(paths, manifest["dtype"])
    if len(records) != entry["records"]:
      raise ConfigError(f"data.paths: {directory!r}: the {name} shards hold {len(records)} "
                        f"records, {MANIFEST} says {entry['records']}; prepare again")
    splits.append(Split(records, entry["tokens"], entry["documents"], paths))
  return Corpus(*splits, "array_record", tok, dict(manifest["skipped"]),
                manifest["split_by_tokens"])


def _tokenizer_differs(config, directory, theirs, how: str) -> ConfigError:
  return ConfigError(f"data.tokenizer={config.data.tokenizer!r}: {directory} was prepared with the "
                     f"tokenizer {theirs['name']!r} ({how}; {MANIFEST}); allowed: that tokenizer, "
                     f"or prepare again with data.tokenizer={config.data.tokenizer!r}")


def _tokenizer(config, directory: str, manifest: dict, log):
  """The run's tokenizer. A "bpe:N" is the one prepare trained (DIR/tokenizer.json), copied into
  the workdir where there is none yet, so that eval, sample and export find it there."""
  if tokenizers.kind(config.data.tokenizer) != "bpe":
    return tokenizers.load_tokenizer(config, None, log)
  workdir = config.training.workdir
  saved = os.path.join(directory, tokenizers.TOKENIZER_FILE)
  if workdir and os.path.exists(os.path.join(workdir, tokenizers.TOKENIZER_FILE)):
    return tokenizers.load_tokenizer(config, None, log)
  if not os.path.exists(saved):
    raise _tokenizer_differs(config, directory, manifest["tokenizer"],
                             f"no {tokenizers.TOKENIZER_FILE} there")
  if workdir:
    os.makedirs(workdir, exist_ok=True)
    shutil.copyfile(saved, os.path.join(workdir, tokenizers.TOKENIZER_FILE))
    return tokenizers.load_tokenizer(config, None, log)
  config = copy.deepcopy(config)
  config.training.workdir = directory
  return tokenizers.load_tokenizer(config, None, log)

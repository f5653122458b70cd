"""A corpus read, split, tokenized and packed into records (design §10), for the grain pipeline
(data/pipeline.py) and for `prepare` (data/prepared.py), which writes the same records to disk;
its own module so that those two import it, not each other.

Packing is concat-then-split: every document's tokens followed by the tokenizer's EOS, all documents
of a split in one flat array, cut into non-overlapping records of exactly seq_len tokens (the tail is
dropped). Record i of a split is tokens[i * seq_len:(i + 1) * seq_len] and i is its example id, the
key that makes masks deterministic (design §7). Ids are per split: train and val both start at 0.
`data.packing="documents"` keeps this layout (a document longer than a record is split at record
edges) and tells the documents in a record apart by its EOS tokens (`document_segments`).
Tokens are stored as uint16 (uint32 for a vocabulary over 65,536 ids).

Documents come from `data.source` (data/sources.py `SOURCES`): files (builtin, text: a file is a
document, split by file) or rows (jsonl, parquet, hf_disk: split by position).
"""
from collections.abc import Callable, Iterable, Sequence
import dataclasses
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm

from stackwise_jax.data import corpus, sources
from stackwise_jax.data.tokenizer import BYTES, EOS_ID, ByteTokenizer, Tokenizer, load_tokenizer
from stackwise_jax.errors import ConfigError


def token_dtype(vocab_size: int) -> np.dtype:
  """uint16 where every id fits (it halves memory and shard size), else uint32."""
  return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def read_tokens(files: Sequence[pathlib.Path], tokenizer: Tokenizer = BYTES) -> np.ndarray:
  """Returns the tokens of `files` in order, each file followed by EOS: [total tokens] in
  `token_dtype`. Bytes are read straight into the array; another tokenizer encodes each file's
  UTF-8 text (undecodable bytes replaced)."""
  if not isinstance(tokenizer, ByteTokenizer):
    return encode_documents((pathlib.Path(f).read_text("utf-8", errors="replace") for f in files),
                            tokenizer)
  blobs = [pathlib.Path(f).read_bytes() for f in files]   # each file is read once
  tokens = np.empty(sum(len(b) + 1 for b in blobs), dtype=np.uint16)
  start = 0
  for blob in blobs:
    tokens[start:start + len(blob)] = np.frombuffer(blob, dtype=np.uint8)
    tokens[start + len(blob)] = EOS_ID
    start += len(blob) + 1
  return tokens


def encode_documents(texts: Iterable[str], tokenizer: Tokenizer) -> np.ndarray:
  """Returns each text's ids followed by `tokenizer.special.eos`, concatenated: [total tokens] in
  `token_dtype(tokenizer.vocab_size)`."""
  dtype = token_dtype(tokenizer.vocab_size)
  eos = np.array([tokenizer.special.eos], dtype)
  parts = []
  for text in texts:
    parts += [tokenizer.encode(text).astype(dtype), eos]
  return np.concatenate(parts) if parts else np.empty(0, dtype)


def pack(tokens: np.ndarray, seq_len: int) -> np.ndarray:
  """Returns `tokens` [N] cut into records [N // seq_len, seq_len] (a view; the tail is dropped)."""
  n = len(tokens) // seq_len
  return tokens[:n * seq_len].reshape(n, seq_len)


def document_segments(tokens, eos_id: int) -> tuple[jax.Array, jax.Array]:
  """The documents of packed records (data.packing="documents"): tokens int [B, T] ->
  (segment_ids, positions), int32 [B, T].

  A segment starts at each record's start and after each EOS (an EOS ends its document, so it
  belongs to it); segment ids count from 0 in each record, positions from 0 at each segment
  start. A pure function of the tokens: any batch (a source's, prepared records, a user's
  iterable) gets the same segments, under jit or not.
  """
  tokens = jnp.asarray(tokens)
  t = tokens.shape[1]
  starts = jnp.zeros(tokens.shape, bool).at[:, 1:].set(tokens[:, :-1] == eos_id)
  segment_ids = jnp.cumsum(starts, axis=1, dtype=jnp.int32)
  index = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), tokens.shape)
  segment_start = jax.lax.cummax(jnp.where(starts, index, 0), axis=1)   # [B, T]
  return segment_ids, index - segment_start


def _cut(tokens: np.ndarray, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
  """One document's tokens split: the last round(val_fraction * n) are val."""
  cut = len(tokens) - int(round(val_fraction * len(tokens)))
  return tokens[:cut], tokens[cut:]


def split_tokens(files: Sequence[pathlib.Path], val_fraction: float,
                 tokenizer: Tokenizer = BYTES, bar: Callable = lambda files: files):
  """Returns (train_tokens, val_tokens, train_files, val_files) for the held-out split.

  With >= 2 files the split is by file (`corpus.split_files`). A single file is split by tokens:
  its last round(val_fraction * n) tokens (n = its tokens + EOS) are val, the rest train; it is then
  listed on both sides. `bar` wraps each side's list of files as it is read (a progress bar).
  """
  train_files, val_files = corpus.split_files(files, val_fraction)
  if val_files:
    return (read_tokens(bar(train_files), tokenizer), read_tokens(bar(val_files), tokenizer),
            train_files, val_files)
  return (*_cut(read_tokens(bar(train_files), tokenizer), val_fraction), train_files, train_files)


class Records:
  """A grain random-access source over packed records (the pipeline's and each mixture entry's):
  item i is record i with its example id, `offset` + i, and, for a mixture entry, its `entry`."""

  def __init__(self, records, offset: int = 0, entry: int | None = None):
    self._records = records   # [num_records, seq_len] uint16 or uint32, or prepared shards
    self._offset, self._entry = offset, entry

  def __len__(self) -> int:
    return len(self._records)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    item = {"tokens": self._records[index].astype(np.int32),
            "example_id": np.int32(self._offset + index)}
    if self._entry is not None:
      item["source"] = np.int32(self._entry)
    return item


@dataclasses.dataclass
class Split:
  """One split of a corpus, packed.

  Attributes:
    records: random access to its records (len(); records[i]: ints [seq_len]), e.g. a NumPy
      array [num_records, seq_len] or prepared ArrayRecord shards.
    tokens: its tokens, EOS included, before packing dropped the tail.
    documents: how many documents it holds (a document split by tokens counts on both sides).
    files: the files they came from.
  """
  records: Any
  tokens: int
  documents: int
  files: list


@dataclasses.dataclass
class Corpus:
  """The packed train and val splits of a run's data, and how they were made.

  Attributes:
    source: the data.source they came from.
    tokenizer: the tokenizer that made the tokens.
    skipped: rows left out: {"bad": bad rows skipped (data.skip_bad_records), "empty": empty texts}.
    by_tokens: one document, split by its tokens (else the documents were split).
  """
  train: Split
  val: Split
  source: str
  tokenizer: Tokenizer
  skipped: dict[str, int] = dataclasses.field(default_factory=lambda: {"bad": 0, "empty": 0})
  by_tokens: bool = False


def text_corpus(files: Sequence[pathlib.Path], seq_len: int, val_fraction: float,
                tokenizer: Tokenizer, source: str = "text", bar: Callable = lambda f: f) -> Corpus:
  """`files`, a document each, split (`split_tokens`) and packed into records of `seq_len`."""
  train, val, train_files, val_files = split_tokens(files, val_fraction, tokenizer, bar)
  return Corpus(Split(pack(train, seq_len), len(train), len(train_files), train_files),
                Split(pack(val, seq_len), len(val), len(val_files), val_files),
                source, tokenizer, by_tokens=train_files == val_files)


def build_corpus(config: ml_collections.ConfigDict, progress: bool = False,
                 log: Callable[[str], None] = print) -> Corpus:
  """Reads, splits, tokenizes and packs the documents `config.data` names (a source that reads
  files or rows, `sources.DOCUMENT_SOURCES`), with `config.training.seq_len`. Loads the run's
  tokenizer (`load_tokenizer`; a "bpe:N" is trained on the train split's texts). `progress` shows
  a bar over the documents.

  Raises:
    ConfigError (a ValueError) naming the field: see `pipeline.make_dataloader`.
  """
  data, seq_len = config.data, config.training.seq_len
  if data.source not in sources.DOCUMENT_SOURCES:
    raise ConfigError(f"data.source={data.source!r}: allowed here: "
                      + ", ".join(map(repr, sources.DOCUMENT_SOURCES)))
  bar = lambda xs: tqdm.tqdm(xs, desc="tokenizing", unit="doc", disable=not progress, leave=False)
  source = sources.SOURCES[data.source]
  if source.reads == "files":
    files = source.read(data)
    train_files, val_files = corpus.split_files(files, data.val_fraction)
    read = lambda f: pathlib.Path(f).read_text("utf-8", errors="replace")
    share = 1 if val_files else 1 - data.val_fraction
    tokenizer = load_tokenizer(config, lambda: (_head(read(f), share) for f in train_files), log)
    return text_corpus(files, seq_len, data.val_fraction, tokenizer, data.source, bar)
  docs = source.read(data)
  in_val = corpus.split_keys([str(i) for i in range(len(docs.texts))], data.val_fraction)
  share = 1 if any(in_val) else 1 - data.val_fraction
  tokenizer = load_tokenizer(
      config, lambda: (_head(t, share) for t, v in zip(docs.texts, in_val) if not v), log)
  sides = [[], []]
  for text, v in zip(docs.texts, in_val):
    sides[v].append(text)
  train, val = (encode_documents(bar(side), tokenizer) for side in sides)
  n_train, n_val = len(sides[0]), len(sides[1])
  by_tokens = not any(in_val)   # one document (or none): split by tokens
  if by_tokens:
    train, val = _cut(train, data.val_fraction)
    n_val = n_train
  return Corpus(Split(pack(train, seq_len), len(train), n_train, docs.files),
                Split(pack(val, seq_len), len(val), n_val, docs.files),
                data.source, tokenizer, {"bad": docs.bad, "empty": docs.empty}, by_tokens)


def _head(text: str, share: float) -> str:
  """The first `share` of `text`: a document split by tokens trains a BPE on its train part only."""
  return text if share >= 1 else text[:int(len(text) * share)]

"""grain pipelines over a packed token stream: shuffled, repeating train batches and fixed eval batches.

Packing is concat-then-split: every document's bytes followed by EOS_ID, all documents of a split in
one flat array, cut into non-overlapping records of exactly seq_len tokens (the tail is dropped).
Record i of a split is tokens[i * seq_len:(i + 1) * seq_len] and i is its example id, the key that
makes masks deterministic (design §7). Ids are per split: train and val both start at 0.

A batch is {"tokens": int32 [batch_size, seq_len], "example_id": int32 [batch_size]}.
"""
from collections.abc import Sequence
import pathlib

from absl import flags
import grain
import ml_collections
import numpy as np

from stackwise_jax.config import ConfigError
from stackwise_jax.data import corpus
from stackwise_jax.data.tokenizer import EOS_ID, VOCAB_SIZE


def read_tokens(files: Sequence[pathlib.Path]) -> np.ndarray:
  """Returns the bytes of `files` in order, each file followed by EOS_ID: uint16 [total tokens].

  uint16 halves the memory of the ~30 MB builtin corpus; records are widened to int32 when read.
  """
  blobs = [pathlib.Path(f).read_bytes() for f in files]   # each file is read once
  tokens = np.empty(sum(len(b) + 1 for b in blobs), dtype=np.uint16)
  start = 0
  for blob in blobs:
    tokens[start:start + len(blob)] = np.frombuffer(blob, dtype=np.uint8)
    tokens[start + len(blob)] = EOS_ID
    start += len(blob) + 1
  return tokens


def pack(tokens: np.ndarray, seq_len: int) -> np.ndarray:
  """Returns `tokens` [N] cut into records [N // seq_len, seq_len] (a view; the tail is dropped)."""
  n = len(tokens) // seq_len
  return tokens[:n * seq_len].reshape(n, seq_len)


def split_tokens(files: Sequence[pathlib.Path], val_fraction: float):
  """Returns (train_tokens, val_tokens, train_files, val_files) for the held-out split.

  With >= 2 files the split is by file (`corpus.split_files`). A single file is split by tokens:
  its last round(val_fraction * n) tokens (n = its bytes + EOS) are val, the rest train; it is then
  listed on both sides.
  """
  train_files, val_files = corpus.split_files(files, val_fraction)
  if val_files:
    return read_tokens(train_files), read_tokens(val_files), train_files, val_files
  tokens = read_tokens(train_files)
  cut = len(tokens) - int(round(val_fraction * len(tokens)))
  return tokens[:cut], tokens[cut:], train_files, train_files


class _Records:
  """A grain random-access source over packed records: item i is record i with its example id."""

  def __init__(self, records: np.ndarray):
    self._records = records   # [num_records, seq_len] uint16

  def __len__(self) -> int:
    return len(self._records)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    return {"tokens": self._records[index].astype(np.int32), "example_id": np.int32(index)}


def _take_default_absl_flags() -> None:
  """Lets grain start worker processes in a program that never parsed absl flags (our argparse CLI).

  grain 0.2.18 reads its `--grain_*` absl flags when it starts workers and raises
  UnparsedFlagAccessError if nobody parsed them; marking them parsed keeps every default.
  """
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


class DataLoader:
  """Train and eval batches over one corpus, split into train and val (design §10).

  Attributes:
    num_train_records, num_val_records: records of seq_len tokens per split (before sharding).
    train_tokens, val_tokens: tokens per split, EOS included, before packing drops the tail.
    train_files, val_files: the documents of each split (the same one file on both sides when a
      single file is split by tokens).
  """

  def __init__(self, files: Sequence[pathlib.Path], *, seq_len: int, batch_size: int,
               val_fraction: float, shuffle_seed: int = 0, num_workers: int = 0,
               shard_index: int = 0, shard_count: int = 1, source: str = "text"):
    """Reads and packs `files` once; the iterators then only index into memory.

    Args:
      files: the documents, in a fixed order.
      seq_len, batch_size: record length in tokens and records per batch.
      val_fraction: the share held out, see `split_tokens`.
      shuffle_seed: seed of the train shuffle (epoch e is shuffled with seed shuffle_seed + e).
      num_workers: 0 reads in this process; > 0 prefetches batches in that many grain worker
        processes (same batches, same order).
      shard_index, shard_count: this host's share of every batch. A global batch holds
        batch_size * shard_count records, and this host reads the shard_index-th contiguous
        batch_size of them (train and eval alike): the global batches, and so the run, are the
        same on any number of hosts.
      source: the corpus name shown by `describe()`.

    Raises:
      ConfigError (a ValueError) naming the field: fewer train records (in this shard) than one
        batch, or no val record.
    """
    if not 0 <= shard_index < shard_count:
      raise ValueError(f"shard_index={shard_index}: allowed: 0 <= shard_index < "
                       f"shard_count={shard_count}")
    self.seq_len, self.batch_size = seq_len, batch_size
    self.shuffle_seed, self.num_workers = shuffle_seed, num_workers
    self.shard_index, self.shard_count, self.source = shard_index, shard_count, source
    self.num_files = len(files)
    train, val, self.train_files, self.val_files = split_tokens(files, val_fraction)
    self.train_tokens, self.val_tokens = len(train), len(val)
    self._train, self._val = pack(train, seq_len), pack(val, seq_len)

    if self.num_train_records < batch_size * shard_count:
      raise ConfigError(
          f"training.batch_size={batch_size * shard_count}: the train split has "
          f"{self.num_train_records} records of training.seq_len={seq_len} tokens "
          f"({self.train_tokens} tokens from {len(self.train_files)} files); allowed: at most "
          f"{self.num_train_records}, or add data (data.paths)")
    if self.num_val_records == 0:
      raise ConfigError(
          f"data.val_fraction={val_fraction!r}: the val split ({len(self.val_files)} files, "
          f"{self.val_tokens} tokens) holds no record of training.seq_len={seq_len} tokens; allowed: "
          f"a larger fraction, more data, or a shorter seq_len")

  @property
  def num_train_records(self) -> int:
    return len(self._train)

  @property
  def num_val_records(self) -> int:
    return len(self._val)

  def train_iter(self) -> grain.DatasetIterator:
    """Returns an endless, checkpointable iterator of shuffled train batches.

    Pipeline: records → shuffle(shuffle_seed) → repeat() → batch → this host's share.
    grain reshuffles each epoch (seed + epoch) and every record appears once per epoch; since
    repeat comes before batch, a batch may straddle two epochs. `it.get_state()` /
    `it.set_state(state)` are grain's own: a fresh iterator set to a saved state yields the same
    batches that followed it. Each call starts again at the first batch.
    """
    ds = grain.MapDataset.source(_Records(self._train)).shuffle(seed=self.shuffle_seed).repeat()
    ds = self._host_share(ds)
    # Records are already in memory: reader threads would only contend for the GIL.
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
    if self.num_workers > 0:
      _take_default_absl_flags()
      ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=self.num_workers))
    return iter(ds)

  def eval_batches(self, n: int) -> list[dict[str, np.ndarray]]:
    """Returns the first `n` batches of the val split in record order ([] for n <= 0).

    Global batch k holds val records k*B .. k*B + B - 1 modulo num_val_records: when n batches
    need more records than the split has, it cycles from record 0 again (so batches may repeat
    records). Each host gets its share of it.
    """
    if n <= 0:
      return []
    ds = self._host_share(grain.MapDataset.source(_Records(self._val)).repeat())
    return [ds[k] for k in range(n)]

  def _host_share(self, records: grain.MapDataset) -> grain.MapDataset:
    """Batches of this host's contiguous share of each global batch: the one place data is
    split between hosts. Lazy: a host reads only its own records."""
    return records.batch(self.batch_size, drop_remainder=True)[self.shard_index::self.shard_count]

  def describe(self) -> str:
    """A one-line summary: source, files, tokens and records per split."""
    by_tokens = " (one file, split by tokens)" if self.num_files == 1 else ""
    shards = f", shard {self.shard_index}/{self.shard_count}" if self.shard_count > 1 else ""
    return (f"data: {self.source}, {self.num_files} files{by_tokens}; "
            f"train {len(self.train_files)} files, {self.train_tokens:,} tokens, "
            f"{self.num_train_records:,} records; "
            f"val {len(self.val_files)} files, {self.val_tokens:,} tokens, "
            f"{self.num_val_records:,} records; "
            f"records of {self.seq_len} tokens, batches of {self.batch_size}{shards}")


def make_dataloader(config: ml_collections.ConfigDict, shard_index: int = 0,
                    shard_count: int = 1) -> DataLoader:
  """Builds the DataLoader that `config.data` and `config.training` describe.

  Raises:
    ConfigError (a ValueError) naming the field: unknown data.source, missing data.paths,
      model.vocab_size too small for the byte tokens, too little data for one batch or one val record.
  """
  data, training = config.data, config.training
  if config.model.vocab_size < VOCAB_SIZE:
    raise ConfigError(f"model.vocab_size={config.model.vocab_size}: allowed: at least "
                      f"{VOCAB_SIZE} (256 bytes + PAD, MASK, BOS, EOS)")
  if data.source == "builtin":
    files = corpus.builtin_corpus_files()
  elif data.source == "text":
    files = corpus.text_files(data.paths)
  else:
    raise ConfigError(f"data.source={data.source!r}: allowed: 'builtin', 'text'")
  if training.batch_size % shard_count:
    raise ConfigError(f"training.batch_size={training.batch_size}: allowed: a multiple of the "
                      f"{shard_count} hosts, which each read an equal share of every batch")
  return DataLoader(files, seq_len=training.seq_len, batch_size=training.batch_size // shard_count,
                    val_fraction=data.val_fraction, shuffle_seed=data.shuffle_seed,
                    num_workers=data.num_workers, shard_index=shard_index,
                    shard_count=shard_count, source=data.source)

"""grain pipelines over a packed corpus (data/packing.py): shuffled, repeating train batches and
fixed eval batches.

The corpus is packed from `data.source`'s documents (data/packing.py), or is the records `prepare`
wrote (array_record: data/prepared.py), which give the same batches as the source they were
prepared from.

A batch is {"tokens": int32 [batch_size, seq_len], "example_id": int32 [batch_size]}.
"""
from collections.abc import Callable, Sequence
import pathlib

from absl import flags
import grain
import ml_collections
import numpy as np

from stackwise_jax.data import mixture, packing, prepared, sources
from stackwise_jax.data.packing import Corpus
from stackwise_jax.data.tokenizer import BYTES, Tokenizer
from stackwise_jax.errors import ConfigError


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
    train_documents, val_documents: documents per split.
    train_files, val_files: the files of each split (the same one file on both sides when a
      single file is split by tokens; all of a row source's files on both sides).
    tokenizer: the Tokenizer that made the tokens.
    skipped: rows left out, {"bad": n, "empty": n} (see data/sources.py).
  """

  def __init__(self, data: Sequence[pathlib.Path] | Corpus, *, seq_len: int, batch_size: int,
               val_fraction: float = 0.05, shuffle_seed: int = 0, num_workers: int = 0,
               shard_index: int = 0, shard_count: int = 1, source: str = "text",
               tokenizer: Tokenizer = BYTES):
    """Reads and packs the documents once; the iterators then only index into the records.

    Args:
      data: text files, the documents in a fixed order, read and split here with `tokenizer`;
        or a Corpus already packed into records of seq_len tokens (`packing.build_corpus`,
        `prepared.open_corpus`), whose source and tokenizer are then its own.
      seq_len, batch_size: record length in tokens and records per batch.
      val_fraction: the share held out, see `packing.split_tokens`.
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
    if not isinstance(data, Corpus):
      data = packing.text_corpus(data, seq_len, val_fraction, tokenizer, source)
    self.seq_len, self.batch_size = seq_len, batch_size
    self.shuffle_seed, self.num_workers = shuffle_seed, num_workers
    self.shard_index, self.shard_count, self.source = shard_index, shard_count, data.source
    self.tokenizer, self.skipped, self.split_by_tokens = data.tokenizer, data.skipped, data.by_tokens
    self.train_files, self.val_files = data.train.files, data.val.files
    self.num_files = len({str(f) for f in self.train_files + self.val_files})
    self.train_tokens, self.val_tokens = data.train.tokens, data.val.tokens
    self.train_documents, self.val_documents = data.train.documents, data.val.documents
    self._train, self._val = data.train.records, data.val.records

    if self.num_train_records < batch_size * shard_count:
      raise ConfigError(
          f"training.batch_size={batch_size * shard_count}: the train split has "
          f"{self.num_train_records} records of training.seq_len={seq_len} tokens "
          f"({self.train_tokens} tokens from {self.train_documents} documents); allowed: at most "
          f"{self.num_train_records}, or add data (data.paths)")
    if self.num_val_records == 0:
      raise ConfigError(
          f"data.val_fraction={val_fraction!r}: the val split ({self.val_documents} documents, "
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
    ds = grain.MapDataset.source(packing.Records(self._train))
    ds = ds.shuffle(seed=self.shuffle_seed).repeat()
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
    ds = self._host_share(grain.MapDataset.source(packing.Records(self._val)).repeat())
    return [ds[k] for k in range(n)]

  def _host_share(self, records: grain.MapDataset) -> grain.MapDataset:
    """Batches of this host's contiguous share of each global batch: the one place data is
    split between hosts. Lazy: a host reads only its own records."""
    return records.batch(self.batch_size, drop_remainder=True)[self.shard_index::self.shard_count]

  def describe(self) -> str:
    """A one-line summary: source, files, documents, tokens and records per split, skipped rows."""
    by_tokens = " (one document, split by tokens)" if self.split_by_tokens else ""
    shards = f", shard {self.shard_index}/{self.shard_count}" if self.shard_count > 1 else ""
    skipped = "".join(f"; skipped {n:,} {what} rows" for what, n in self.skipped.items() if n)
    return (f"data: {self.source}, {self.num_files} files{by_tokens}; "
            f"train {self.train_documents:,} documents, {self.train_tokens:,} tokens, "
            f"{self.num_train_records:,} records; "
            f"val {self.val_documents:,} documents, {self.val_tokens:,} tokens, "
            f"{self.num_val_records:,} records; "
            f"records of {self.seq_len} tokens, batches of {self.batch_size}{shards}; "
            f"tokenizer {self.tokenizer.name} ({self.tokenizer.vocab_size:,} ids){skipped}")


def make_dataloader(config: ml_collections.ConfigDict, shard_index: int = 0,
                    shard_count: int = 1, log: Callable[[str], None] = print,
                    ) -> "DataLoader | mixture.MixtureLoader":
  """Builds the DataLoader that `config.data` and `config.training` describe, with the run's
  tokenizer (`dataloader.tokenizer`; a "bpe:N" is trained on the train split's texts, see
  `load_tokenizer`); a MixtureLoader where data.mixture lists sources (data/mixture.py).

  Raises:
    ConfigError (a ValueError) naming the field: unknown data.source, missing data.paths, a bad
      row (data/sources.py), model.vocab_size too small for the tokenizer, a prepared data set
      that does not match the config, too little data for one batch or one val record.
  """
  data, training = config.data, config.training
  if training.batch_size % shard_count:
    raise ConfigError(f"training.batch_size={training.batch_size}: allowed: a multiple of the "
                      f"{shard_count} hosts, which each read an equal share of every batch")
  if data.mixture:   # several sources, weighted by stage
    return mixture.make_mixture_loader(config, shard_index, shard_count, log)
  if data.source in sources.PREPARED_SOURCES:
    packed = prepared.open_corpus(config, log)
  else:
    packed = packing.build_corpus(config, log=log)
  return DataLoader(packed, seq_len=training.seq_len, batch_size=training.batch_size // shard_count,
                    val_fraction=data.val_fraction, shuffle_seed=data.shuffle_seed,
                    num_workers=data.num_workers, shard_index=shard_index,
                    shard_count=shard_count)

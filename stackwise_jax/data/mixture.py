"""Data mixtures (design §10): several sources sampled by weight, the weights changing by stage (a
curriculum over growth): `data.mixture` lists the sources, `data.mixture_by_stage` their weights
per stage.

Each entry is packed into its own corpus exactly as a run of that source alone would pack it
(`entry_config`: the run's config with the entry's source, paths and text_field), all with the
run's one tokenizer (`data.tokenizer`; a "bpe:N" is refused by config validation, since it would
be trained on one source's texts). A train batch draws each record's source by the current
stage's weights, deterministically from `data.shuffle_seed` and the batch's index, then takes that
source's next record from its own stream: grain's shuffled, repeated MapDataset over its records,
seeded like a single-source run's (entry k: shuffle_seed + k * SEED_STRIDE). Eval batches are
fixed: mixed at the entries' own weights from a seed of their own, each source's val records in
order; and each source's own val split (`eval_batches_by_source`).

A batch is {"tokens": int32 [B, T], "example_id": int32 [B], "source": int32 [B]}: `source` is the
mixture entry of each record (per-source token counts; the model and masking never read it), and
example ids are offset by the records of the entries before, so no two records share one.
"""
from collections.abc import Callable
import copy

import grain
import ml_collections
import numpy as np

from stackwise_jax.data import packing, prepared, sources
from stackwise_jax.data.packing import Corpus
from stackwise_jax.errors import ConfigError

# grain shuffles epoch e with seed + e: the entries' seeds stay a million epochs apart.
SEED_STRIDE = 1 << 20
_TRAIN_STREAM, _EVAL_STREAM = 1, 2   # the chooser's random streams: train (with the seed), eval


def entry_names(mixture) -> list[str]:
  """A stable, readable name per mixture entry: its source, with its index where the source
  appears more than once (`text.0`, `text.2`)."""
  kinds = [dict(e)["source"] for e in mixture]
  return [s if kinds.count(s) == 1 else f"{s}.{k}" for k, s in enumerate(kinds)]


def entry_config(config: ml_collections.ConfigDict, k: int) -> ml_collections.ConfigDict:
  """The config of a run of mixture entry `k` alone: `config` with the entry's data.source,
  data.paths and data.text_field (the run's where the entry names none), and no mixture."""
  entry = dict(config.data.mixture[k])
  config = copy.deepcopy(config)
  config.data.source = entry["source"]
  config.data.paths = tuple(entry.get("paths", ()))
  config.data.text_field = entry.get("text_field", config.data.text_field)
  config.data.mixture, config.data.mixture_by_stage = (), ()
  return config


def choose(u: np.ndarray, weights: np.ndarray) -> np.ndarray:
  """The entry of each record: u float [n] uniform in [0, 1) -> int64 [n], entry k with
  probability weights[k] (normalized). An entry of weight 0 is never chosen."""
  cdf = np.cumsum(weights) / np.sum(weights)
  # Rounding can leave cdf[-1] a hair under 1; the last entry of positive weight takes that gap.
  return np.minimum(np.searchsorted(cdf, u, side="right"), np.flatnonzero(weights > 0)[-1])


def _stack(records: list[dict]) -> dict[str, np.ndarray]:
  return {key: np.stack([r[key] for r in records]) for key in records[0]}


class MixtureLoader:
  """Train and eval batches mixed from several corpora, one per data.mixture entry, by weights
  that may change by stage (module docstring). The trainer's dataloader interface, as DataLoader's.

  Attributes:
    names: a name per entry (`entry_names`), the keys of results' per-source numbers.
    corpora: the packed Corpus of each entry.
    weights: float64 [stages given, entries]: each stage's probabilities (normalized); the
      last row holds for later stages.
    eval_weights: float64 [entries]: the probabilities that mix the eval batches (a run's: the
      entries' own weights).
    num_train_records, num_val_records: records per split, all entries together.
    tokenizer: the one tokenizer of every entry.
    skipped: rows left out, all entries together (see data/sources.py).
  """

  def __init__(self, corpora: list[Corpus], names: list[str], weights, eval_weights=None, *,
               seq_len: int, batch_size: int, shuffle_seed: int = 0, shard_index: int = 0,
               shard_count: int = 1):
    """Args:
      corpora, names: each entry's packed corpus (`packing.build_corpus`, `prepared.open_corpus`,
        one tokenizer for all) and its name.
      weights: [stages, entries] weights (>= 0, a row not all zero), row k for stage k + 1, the
        last for later stages.
      eval_weights: [entries] the weights that mix the eval batches (default: the first row).
      seq_len, batch_size, shuffle_seed, shard_index, shard_count: as DataLoader's.

    Raises:
      ConfigError naming data.mixture: an entry with no train or no val record, entries made
        with different tokenizers.
    """
    self.corpora, self.names = list(corpora), list(names)
    self.weights = np.asarray(weights, np.float64)
    self.weights /= self.weights.sum(axis=1, keepdims=True)
    self.eval_weights = np.asarray(self.weights[0] if eval_weights is None else eval_weights,
                                   np.float64)
    self.eval_weights /= self.eval_weights.sum()
    self.seq_len, self.batch_size, self.shuffle_seed = seq_len, batch_size, shuffle_seed
    self.shard_index, self.shard_count = shard_index, shard_count
    self.source = "mixture"
    self.tokenizer = corpora[0].tokenizer
    for name, c in zip(names, corpora):
      if c.tokenizer.fingerprint != self.tokenizer.fingerprint:
        raise ConfigError(f"data.mixture: the entry {name} was tokenized with {c.tokenizer.name}, "
                          f"{names[0]} with {self.tokenizer.name}; allowed: one data.tokenizer "
                          "for every entry (prepared entries: prepared with it)")
      for split in ("train", "val"):
        if len(getattr(c, split).records) == 0:
          raise ConfigError(f"data.mixture: the entry {name} has no {split} record of "
                            f"training.seq_len={seq_len} tokens ({getattr(c, split).tokens} "
                            f"tokens); allowed: more data for it, a shorter seq_len, or another "
                            "data.val_fraction")
    self.skipped = {what: sum(c.skipped.get(what, 0) for c in corpora) for what in ("bad", "empty")}
    train_offsets = np.cumsum([0] + [len(c.train.records) for c in corpora])
    val_offsets = np.cumsum([0] + [len(c.val.records) for c in corpora])
    self.num_train_records, self.num_val_records = int(train_offsets[-1]), int(val_offsets[-1])
    # Entry k's train stream: a single-source run's (shuffled, each epoch anew; repeated), read
    # by position, so that any host reads exactly its share and a position is all its state.
    self._streams = [
        grain.MapDataset.source(packing.Records(c.train.records, int(train_offsets[k]), k))
        .shuffle(seed=(shuffle_seed + k * SEED_STRIDE) % 2**32).repeat()
        for k, c in enumerate(corpora)]
    self._val = [
        grain.MapDataset.source(packing.Records(c.val.records, int(val_offsets[k]), k)).repeat()
        for k, c in enumerate(corpora)]

  @property
  def global_batch_size(self) -> int:
    return self.batch_size * self.shard_count

  def weights_at(self, stage: int) -> np.ndarray:
    """float64 [entries]: stage `stage`'s (1-based) probabilities; the last row for later ones."""
    return self.weights[min(stage, len(self.weights)) - 1]

  def host_share(self, records: list) -> list:
    """This host's contiguous share of a global batch's records (as DataLoader shares them)."""
    return records[self.shard_index * self.batch_size:(self.shard_index + 1) * self.batch_size]

  def train_iter(self) -> "MixtureIterator":
    """An endless, checkpointable iterator of mixed train batches, at stage 1 (`set_stage`)."""
    return MixtureIterator(self)

  def eval_batches(self, n: int) -> list[dict[str, np.ndarray]]:
    """The first `n` mixed eval batches ([] for n <= 0): each record's entry drawn at
    `eval_weights` from a seed of their own, each entry's val records in order, cycling; the same
    at every stage and for every shuffle_seed. This host's share of each."""
    positions, batches = np.zeros(len(self.names), np.int64), []
    for k in range(max(n, 0)):
      u = np.random.default_rng([_EVAL_STREAM, k]).random(self.global_batch_size)
      entries = choose(u, self.eval_weights)
      places = _places(entries, positions)
      positions += np.bincount(entries, minlength=len(self.names))
      batches.append(_stack(self.host_share(
          [self._val[e][int(p)] for e, p in zip(entries, places)])))
    return batches

  def eval_batches_by_source(self, n: int) -> dict[str, list[dict[str, np.ndarray]]]:
    """{name: the first `n` batches of that entry's val split}, in record order as
    DataLoader.eval_batches gives a single source's (cycling); this host's share of each."""
    b = self.global_batch_size
    return {name: [_stack(self.host_share([val[k * b + i] for i in range(b)]))
                   for k in range(max(n, 0))]
            for name, val in zip(self.names, self._val)}

  def describe(self) -> str:
    """A one-line summary: per entry its records per split and tokens; the weights by stage;
    record and batch sizes; the tokenizer; skipped rows."""
    entries = "; ".join(
        f"{name} ({c.source}, {c.train.documents:,} train documents, {c.train.tokens:,} tokens, "
        f"{len(c.train.records):,} records; val {len(c.val.records):,} records)"
        for name, c in zip(self.names, self.corpora))
    rows = ", ".join("[" + " ".join(f"{w:.3g}" for w in row) + "]" for row in self.weights)
    shards = f", shard {self.shard_index}/{self.shard_count}" if self.shard_count > 1 else ""
    skipped = "".join(f"; skipped {n:,} {what} rows" for what, n in self.skipped.items() if n)
    return (f"data: mixture of {len(self.names)} sources: {entries}; weights by stage {rows} "
            f"(the last for later stages); records of {self.seq_len} tokens, batches of "
            f"{self.batch_size}{shards}; tokenizer {self.tokenizer.name} "
            f"({self.tokenizer.vocab_size:,} ids){skipped}")


def _places(entries: np.ndarray, starts: np.ndarray) -> np.ndarray:
  """Each record's position in its entry's stream: entries int [n] (the entry of each record of
  a batch, in order), starts int [entries] (each stream's position before the batch) -> int [n]:
  starts[e] plus the records of entry e before it in the batch."""
  places = np.empty(len(entries), np.int64)
  for e in np.unique(entries):
    mine = entries == e
    places[mine] = starts[e] + np.arange(np.count_nonzero(mine))
  return places


class MixtureIterator:
  """Mixed train batches, endless (MixtureLoader.train_iter).

  Why not grain's `MapDataset.mix` / `IterDataset.mix`: they take one fixed set of weights for
  the whole stream, and the weights here change when a stage starts (`set_stage`, which the
  trainer calls), at a batch boundary; so the entry of each record is drawn here: uniforms from
  (shuffle_seed, batch index) through `choose` at the stage's weights. Every host draws the
  whole global batch's entries, so the streams advance alike on every host and each reads only
  its own share.

  State (`get_state`, JSON for the run's checkpoints; `set_state` gives the same batches that
  followed it): the stage, global batches drawn, each entry's stream position, and the records
  each entry gave each stage (`records_by_stage`, for results' tokens by source).
  """

  def __init__(self, loader: MixtureLoader):
    self._loader = loader
    n = len(loader.names)
    self._stage, self._batches = 1, 0
    self._positions = np.zeros(n, np.int64)
    self._by_stage = [np.zeros(n, np.int64)]   # [stage - 1] -> records per entry

  @property
  def names(self) -> list[str]:
    return self._loader.names

  def weights_at(self, stage: int) -> np.ndarray:
    return self._loader.weights_at(stage)

  def set_stage(self, stage: int) -> None:
    """From the next batch on, draws entries by stage `stage`'s (1-based) weights."""
    self._stage = stage
    while len(self._by_stage) < stage:
      self._by_stage.append(np.zeros(len(self.names), np.int64))

  def records_by_stage(self, stage: int) -> np.ndarray:
    """int64 [entries]: the records (of every host's share) each entry gave stage `stage`."""
    return (self._by_stage[stage - 1].copy() if stage <= len(self._by_stage)
            else np.zeros(len(self.names), np.int64))

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    loader = self._loader
    u = np.random.default_rng([loader.shuffle_seed, _TRAIN_STREAM, self._batches]).random(
        loader.global_batch_size)
    entries = choose(u, loader.weights_at(self._stage))   # [global batch]
    places = _places(entries, self._positions)
    counts = np.bincount(entries, minlength=len(self.names))
    batch = _stack(loader.host_share(
        [loader._streams[e][int(p)] for e, p in zip(entries, places)]))
    self._positions += counts
    self._by_stage[self._stage - 1] += counts
    self._batches += 1
    return batch

  def get_state(self) -> dict:
    return {"mixture": list(self.names), "stage": self._stage, "batches": self._batches,
            "positions": self._positions.tolist(),
            "records_by_stage": [row.tolist() for row in self._by_stage]}

  def set_state(self, state: dict) -> None:
    """Goes on from `get_state()`'s `state`. ValueError if it is not a state of these entries."""
    if not isinstance(state, dict) or state.get("mixture") != list(self.names):
      got = state.get("mixture") if isinstance(state, dict) else type(state).__name__
      raise ValueError(f"data-iterator state: not one of the mixture {self.names} (its entries: "
                       f"{got}); resume with the config the run was started with")
    self._stage, self._batches = int(state["stage"]), int(state["batches"])
    self._positions = np.asarray(state["positions"], np.int64)
    self._by_stage = [np.asarray(row, np.int64) for row in state["records_by_stage"]]


def _entry_corpus(config: ml_collections.ConfigDict, log) -> Corpus:
  """One entry's corpus, built as `pipeline.make_dataloader` builds a single source's."""
  if config.data.source in sources.PREPARED_SOURCES:
    return prepared.open_corpus(config, log)
  return packing.build_corpus(config, log=log)


def make_mixture_loader(config: ml_collections.ConfigDict, shard_index: int = 0,
                        shard_count: int = 1,
                        log: Callable[[str], None] = print) -> MixtureLoader:
  """The MixtureLoader of `config.data.mixture` (non-empty) and `config.data.mixture_by_stage`;
  `pipeline.make_dataloader` returns it for such a config.

  Raises:
    ConfigError naming data.mixture[k] (a one-line message): what a single-source run of that
      entry refuses (missing files, bad rows, a prepared set that does not match), paths a source
      does not take; and see MixtureLoader.
  """
  data, training = config.data, config.training
  names = entry_names(data.mixture)
  corpora = []
  for k, name in enumerate(names):
    entry = entry_config(config, k)
    source, paths = entry.data.source, entry.data.paths
    takes = sources.SOURCES[source].paths
    try:
      if takes == "files" and not paths:
        raise ConfigError(f"paths=(): allowed: at least one file or glob for source {source!r}")
      if takes == "directory" and len(paths) != 1:
        raise ConfigError(f"paths={paths!r}: allowed: exactly one directory for source {source!r}")
      corpora.append(_entry_corpus(entry, log))
    except ConfigError as e:
      raise ConfigError(f"data.mixture[{k}] ({name}): {e}") from None
  own = [dict(e)["weight"] for e in data.mixture]
  return MixtureLoader(corpora, names, data.mixture_by_stage or [own], own,
                       seq_len=training.seq_len,
                       batch_size=training.batch_size // shard_count,
                       shuffle_seed=data.shuffle_seed, shard_index=shard_index,
                       shard_count=shard_count)

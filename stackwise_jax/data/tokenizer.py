"""Tokenizers (design §10), chosen by `data.tokenizer`:

- "bytes" (the default): ids 0..255 are the bytes of UTF-8 text, then PAD, MASK, BOS, EOS;
- a `tokenizer.json` path (Hugging Face `tokenizers`);
- a SentencePiece `.model` path (the `[text]` extra);
- "bpe:N": a byte-level BPE of N ids trained with `tokenizers` on the run's train split, saved to
  WORKDIR/tokenizer.json and read back from there on resume, eval, sample and export.

Every tokenizer has the four special ids. A loaded file that lacks one gets it as an added token
after its own ids (reported by `Tokenizer.added`). `training.progressive.mask_token_id`, where set,
replaces the tokenizer's mask id (`special_ids`). The byte tokenizer's ids are the module
constants below; its `encode`/`decode` are also plain functions.
"""
import dataclasses
import functools
import hashlib
import os
import re

import numpy as np

from stackwise_jax.errors import ConfigError

PAD_ID = 256
MASK_ID = 257
BOS_ID = 258
EOS_ID = 259   # appended after every document when a corpus is packed (see packing.py)
VOCAB_SIZE = 260

# Special tokens: ours first, then the names common tokenizers use for the same role.
SPECIAL_NAMES = {"pad": ("<pad>", "[PAD]", "<|padding|>"),
                 "mask": ("<mask>", "[MASK]", "<|mask|>"),
                 "bos": ("<bos>", "<s>", "[CLS]", "<|startoftext|>", "<|endoftext|>"),
                 "eos": ("<eos>", "</s>", "[SEP]", "<|endoftext|>")}
BPE_PATTERN = re.compile(r"bpe:(\d+)\Z")
BPE_SPECIALS = [names[0] for names in SPECIAL_NAMES.values()]   # ids 0..3 of a trained BPE
TOKENIZER_FILE = "tokenizer.json"   # a trained BPE's (and an export's) file name


def encode(text: str | bytes) -> np.ndarray:
  """Returns the byte ids of `text` (UTF-8 for a str): int32 [len(bytes)], no special ids added."""
  data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
  return np.frombuffer(data, dtype=np.uint8).astype(np.int32)


def decode(ids) -> str:
  """Returns the text of `ids` (any int array-like, e.g. [T]); special ids are skipped.

  Byte runs that are not valid UTF-8 (e.g. a character cut by a record boundary) become U+FFFD.
  """
  ids = np.asarray(ids).reshape(-1)
  byte_ids = ids[(ids >= 0) & (ids < 256)]
  return byte_ids.astype(np.uint8).tobytes().decode("utf-8", errors="replace")


@dataclasses.dataclass(frozen=True)
class SpecialIds:
  pad: int
  mask: int
  bos: int
  eos: int


class Tokenizer:
  """What the run needs from a tokenizer.

  Attributes:
    name: the `data.tokenizer` value it came from.
    vocab_size: ids are 0..vocab_size - 1 (special and added tokens included).
    special: its SpecialIds.
    token_bytes: int32 [vocab_size]: the UTF-8 bytes each id stands for (0 for special ids), for
      bits per byte.
    added: special tokens the file lacked and this tokenizer added after its own ids.
  """
  name: str
  vocab_size: int
  special: SpecialIds
  token_bytes: np.ndarray
  added: tuple[str, ...] = ()

  def encode(self, text: str) -> np.ndarray:
    """int32 [n]: the ids of `text`, no special ids added."""
    raise NotImplementedError

  def decode(self, ids) -> str:
    """The text of `ids` (any int array-like); special ids are skipped."""
    raise NotImplementedError

  @property
  def fingerprint(self) -> str:
    """sha256 hex of the vocabulary and special ids: equal exactly when two tokenizers give the
    same ids (a prepared data set records it)."""
    return hashlib.sha256(self._identity() + repr(self.special).encode()).hexdigest()

  def _identity(self) -> bytes:
    raise NotImplementedError

  def save(self, directory: str) -> str | None:
    """Writes the tokenizer's file into `directory` (as it is used, added tokens included);
    returns its path, or None for bytes (nothing to save)."""
    raise NotImplementedError


class ByteTokenizer(Tokenizer):
  name, vocab_size = "bytes", VOCAB_SIZE
  special = SpecialIds(pad=PAD_ID, mask=MASK_ID, bos=BOS_ID, eos=EOS_ID)
  token_bytes = np.concatenate([np.ones(256, np.int32), np.zeros(4, np.int32)])

  def encode(self, text):
    return encode(text)

  def decode(self, ids):
    return decode(ids)

  def _identity(self):
    return b"bytes"

  def save(self, directory):
    return None


BYTES = ByteTokenizer()


class HFTokenizer(Tokenizer):
  """A Hugging Face `tokenizers.Tokenizer` (a tokenizer.json, or a BPE trained here)."""

  def __init__(self, tok, name: str):
    self.name = name
    self.added = _add_missing_specials(tok, lambda t: tok.token_to_id(t) is not None,
                                       lambda new: tok.add_special_tokens(new))
    ids = {role: next(tok.token_to_id(t) for t in names if tok.token_to_id(t) is not None)
           for role, names in SPECIAL_NAMES.items()}
    self.special = SpecialIds(**ids)
    self._tok = tok
    self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
    specials = {t.content for t in tok.get_added_tokens_decoder().values() if t.special}
    byte_level = type(tok.decoder).__name__ == "ByteLevel"
    table = np.zeros(self.vocab_size, np.int32)
    for i in range(self.vocab_size):
      piece = tok.id_to_token(i)
      if piece is None or piece in specials:
        continue
      # A byte-level piece spells one byte per character (GPT-2's byte alphabet); other pieces
      # are measured by their decoded text.
      table[i] = len(piece) if byte_level else len(tok.decode([i]).encode("utf-8"))
    self.token_bytes = table

  def encode(self, text):
    return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, np.int32)

  def decode(self, ids):
    ids = [int(i) for i in np.asarray(ids).reshape(-1) if 0 <= i < self.vocab_size]
    return self._tok.decode(ids, skip_special_tokens=True)

  def piece(self, i: int) -> str:
    """The token string of id `i` (a special token's name, e.g. "<bos>")."""
    return self._tok.id_to_token(i)

  def _identity(self):
    return self._tok.to_str().encode()

  def save(self, directory):
    path = os.path.join(directory, TOKENIZER_FILE)
    self._tok.save(path)
    return path


class SentencePieceTokenizer(Tokenizer):
  """A SentencePiece model. Special ids it has no piece for come after its pieces."""

  def __init__(self, processor, name: str):
    self.name, self._sp = name, processor
    n = processor.get_piece_size()
    own = {"pad": processor.pad_id(), "bos": processor.bos_id(), "eos": processor.eos_id(),
           "mask": next((processor.piece_to_id(p) for p in SPECIAL_NAMES["mask"]
                         if processor.piece_to_id(p) != processor.unk_id()), -1)}
    missing = [role for role in SPECIAL_NAMES if own[role] < 0]
    self.added = tuple(SPECIAL_NAMES[role][0] for role in missing)
    own.update({role: n + k for k, role in enumerate(missing)})
    self.special = SpecialIds(**own)
    self.vocab_size = n + len(missing)
    table = np.zeros(self.vocab_size, np.int32)
    for i in range(n):
      if processor.is_byte(i):
        table[i] = 1
      elif not (processor.is_control(i) or processor.is_unknown(i) or processor.is_unused(i)):
        table[i] = len(processor.id_to_piece(i).replace("\u2581", " ").encode("utf-8"))
    self.token_bytes = table

  def encode(self, text):
    return np.asarray(self._sp.encode(text), np.int32)

  def decode(self, ids):
    n = self._sp.get_piece_size()
    return self._sp.decode([int(i) for i in np.asarray(ids).reshape(-1) if 0 <= i < n])

  @property
  def adds_dummy_prefix(self) -> bool:
    """Whether the model puts a "▁" (a space) before a text's first word."""
    return self._sp.encode_as_pieces("a")[0].startswith("\u2581")

  def piece(self, i: int) -> str:
    """The piece of id `i`; an id after the model's pieces is one of our added specials."""
    n = self._sp.get_piece_size()
    return self._sp.id_to_piece(i) if i < n else self.added[i - n]

  def _identity(self):
    return self._sp.serialized_model_proto()

  def save(self, directory):
    path = os.path.join(directory, "tokenizer.model")
    with open(path, "wb") as f:
      f.write(self._sp.serialized_model_proto())
    return path


def _add_missing_specials(tok, has, add) -> tuple[str, ...]:
  """Adds our name of every special role `tok` has no token for; returns the names added."""
  missing = tuple(names[0] for names in SPECIAL_NAMES.values() if not any(map(has, names)))
  if missing:
    add(list(missing))
  return missing


def kind(name: str) -> str:
  """"bytes", "bpe", "json" or "sentencepiece": how `data.tokenizer`=`name` is read."""
  if name == "bytes":
    return "bytes"
  if BPE_PATTERN.match(name):
    return "bpe"
  if name.endswith(".json"):
    return "json"
  if name.endswith(".model"):
    return "sentencepiece"
  raise ConfigError(f"data.tokenizer={name!r}: allowed: 'bytes', 'bpe:N' (N >= {VOCAB_SIZE}), a "
                    "tokenizer.json path, or a SentencePiece .model path")


def is_valid_name(name) -> bool:
  """Whether `data.tokenizer`=`name` names a tokenizer (a file is only checked to exist)."""
  try:
    how = kind(name)
    return bpe_size(name) > 0 if how == "bpe" else how == "bytes" or os.path.isfile(name)
  except ConfigError:
    return False


@functools.lru_cache(maxsize=8)
def load_file(path: str) -> Tokenizer:
  """The tokenizer in `path` (a tokenizer.json or a SentencePiece .model). An empty, missing or
  unreadable file is a ConfigError naming it."""
  what = f"data.tokenizer={path!r}"
  if not os.path.isfile(path):
    raise ConfigError(f"{what}: no such file")
  if os.path.getsize(path) == 0:
    raise ConfigError(f"{what}: the file is empty")
  if kind(path) == "sentencepiece":
    try:
      import sentencepiece
    except ImportError as e:
      raise ConfigError(f"{what}: SentencePiece models need the [text] extra "
                        "(pip install -e '.[text]')") from e
    processor = sentencepiece.SentencePieceProcessor()
    try:
      processor.load(path)
    except (OSError, RuntimeError) as e:
      raise ConfigError(f"{what}: not a readable SentencePiece model ({e})") from e
    return SentencePieceTokenizer(processor, path)
  import tokenizers
  try:
    tok = tokenizers.Tokenizer.from_file(path)
  except Exception as e:   # tokenizers raises a bare Exception for a malformed file
    raise ConfigError(f"{what}: not a readable tokenizer.json ({str(e).splitlines()[0]})") from e
  return HFTokenizer(tok, path)


def train_bpe(texts, vocab_size: int) -> HFTokenizer:
  """A byte-level BPE of `vocab_size` ids trained on `texts` (an iterable of str), offline. Its
  special tokens are ids 0..3 (BPE_SPECIALS), so they are known before it is trained."""
  import tokenizers
  from tokenizers import decoders, models, pre_tokenizers, trainers
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=BPE_SPECIALS,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                show_progress=False)
  tok.train_from_iterator(texts, trainer)
  return HFTokenizer(tok, f"bpe:{vocab_size}")


def bpe_size(name: str) -> int:
  """N of "bpe:N", checked: room for the 256 bytes and the four special tokens."""
  n = int(BPE_PATTERN.match(name).group(1))
  if n < VOCAB_SIZE:
    raise ConfigError(f"data.tokenizer={name!r}: allowed: bpe:N with N >= {VOCAB_SIZE} (256 bytes "
                      "and 4 special tokens)")
  return n


def load_tokenizer(config, train_texts=None, log=print) -> Tokenizer:
  """The run's tokenizer, checked against `model.vocab_size`.

  "bpe:N" is read from WORKDIR/tokenizer.json (training.workdir) when there; else it is trained on
  `train_texts()` (a function giving the train split's texts) and saved there. Without either,
  a ConfigError says what is missing."""
  name = config.data.tokenizer
  how = kind(name)
  if how == "bytes":
    tok = BYTES
  elif how == "bpe":
    tok = _bpe(config, bpe_size(name), train_texts, log)
  else:
    tok = load_file(name)
  if config.model.vocab_size < tok.vocab_size:
    raise ConfigError(f"model.vocab_size={config.model.vocab_size}: the tokenizer {name!r} has "
                      f"{tok.vocab_size} ids; allowed: at least {tok.vocab_size}")
  return tok


def _trained_file(config) -> str | None:
  """Where a run's trained BPE lives: WORKDIR/tokenizer.json (None without a workdir)."""
  workdir = config.training.workdir
  return os.path.join(workdir, TOKENIZER_FILE) if workdir else None


def _bpe(config, n: int, train_texts, log) -> Tokenizer:
  path = _trained_file(config)
  if path and os.path.exists(path):
    tok = load_file(path)
    # A small corpus may end training below N ids (no pair left to merge); never above.
    if tok.vocab_size > n:
      raise ConfigError(f"data.tokenizer='bpe:{n}': {path} holds a tokenizer of {tok.vocab_size} "
                        "ids, trained for another run; allowed: at most N ids, or another "
                        "--workdir")
    return tok
  if train_texts is None:
    raise ConfigError(f"data.tokenizer='bpe:{n}': no trained tokenizer at "
                      f"{path or 'training.workdir (unset)'}; train a run first")
  log(f"training a byte-level BPE of {n} ids on the train split")
  tok = train_bpe(train_texts(), n)
  if path:
    os.makedirs(config.training.workdir, exist_ok=True)
    tok.save(config.training.workdir)
    load_file.cache_clear()
  return tok


def sampled_ids(config) -> tuple[int, tuple[int, ...]]:
  """(n, excluded): sampling chooses among ids 0..n-1 less `excluded` (the special ids, the run's
  mask id included). Bytes: (256, ()), the specials come after the bytes."""
  name, mask = config.data.tokenizer, special_ids(config).mask
  how = kind(name)
  if how == "bytes":
    n, excluded = 256, set()
  elif how == "bpe":   # N, or fewer where training stopped short and the file says so
    n, excluded = _trained_size(config, bpe_size(name)), set(range(len(BPE_SPECIALS)))
  else:
    tok = load_file(name)
    n, excluded = tok.vocab_size, {int(i) for i in np.flatnonzero(tok.token_bytes == 0)}
  return n, tuple(sorted(excluded | ({mask} if mask < n else set())))


def _trained_size(config, n: int) -> int:
  path = _trained_file(config)
  return load_file(path).vocab_size if path and os.path.isfile(path) else n


def special_ids(config) -> SpecialIds:
  """The run's special ids, known without training or data: its tokenizer's (a trained BPE's
  are BPE_SPECIALS, ids 0..3), with `training.progressive.mask_token_id` as the mask where set."""
  name = config.data.tokenizer
  how = kind(name)
  if how == "bytes":
    ids = BYTES.special
  elif how == "bpe":
    ids = SpecialIds(*range(4))
  else:
    ids = load_file(name).special
  mask = config.training.progressive.mask_token_id
  return ids if mask is None else dataclasses.replace(ids, mask=mask)

"""Byte-level tokens: ids 0..255 are the bytes of UTF-8 text, then four special ids.

config.model.vocab_size (260) and config.training.progressive.mask_token_id (257) default to the
values below; tests/test_data.py checks they stay in step. Training and sampling mask with the
config's mask_token_id, never MASK_ID itself; PAD_ID is the pad id the loss leaves out
(progressive/masking.py reads it here).
"""
import numpy as np

PAD_ID = 256
MASK_ID = 257
BOS_ID = 258
EOS_ID = 259   # appended after every document when a corpus is packed (see pipeline.py)
VOCAB_SIZE = 260


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

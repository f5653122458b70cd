"""Where documents come from (design §10): the built-in stdlib corpus or text files, and the split.

A document is one file. File lists are sorted so that every run sees the same order, and the
train/val split is a stable hash of each file's relative path, so it does not depend on the machine,
on Python's salted hash() or on which other files are present.
"""
from collections.abc import Sequence
import glob
import hashlib
import os
import pathlib
import sysconfig

from stackwise_jax.errors import ConfigError

_SKIPPED_DIRS = ("site-packages", "dist-packages")   # installed packages are not the stdlib


def builtin_corpus_files() -> list[pathlib.Path]:
  """Returns the Python standard library's own `.py` files on this machine, sorted by relative path.

  Raises:
    ValueError: no `.py` file under `sysconfig.get_paths()["stdlib"]`.
  """
  root = pathlib.Path(sysconfig.get_paths()["stdlib"])
  found = []
  for dirpath, dirnames, filenames in os.walk(root):
    # Pruned in place: os.walk then never descends into installed packages.
    dirnames[:] = [d for d in dirnames if d not in _SKIPPED_DIRS]
    found.extend(pathlib.Path(dirpath, f) for f in filenames if f.endswith(".py"))
  if not found:
    raise ValueError(f"data.source='builtin': no .py files under the stdlib directory {root}; "
                     "use data.source='text' with data.paths instead")
  return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def text_files(paths: Sequence[str]) -> list[pathlib.Path]:
  """Returns the files named by `paths` (plain files or glob patterns, `**` recursive), sorted.

  Files matched twice are listed once.

  Raises:
    ConfigError (a ValueError) naming `data.paths`: an empty list, a pattern that matches no file,
      or a plain path that is missing or a directory.
  """
  if not paths:
    raise ConfigError("data.paths=(): allowed: at least one file or glob when data.source='text'")
  found = {}
  for pattern in paths:
    if glob.has_magic(pattern):
      matches = [m for m in glob.glob(pattern, recursive=True) if os.path.isfile(m)]
      if not matches:
        raise ConfigError(f"data.paths: {pattern!r} matches no files")
    elif os.path.isdir(pattern):
      raise ConfigError(f"data.paths: {pattern!r} is a directory; allowed: files or globs, "
                        f"e.g. {os.path.join(pattern, '**', '*.txt')!r}")
    elif not os.path.isfile(pattern):
      raise ConfigError(f"data.paths: {pattern!r}: no such file")
    else:
      matches = [pattern]
    for m in matches:
      found.setdefault(os.path.abspath(m), pathlib.Path(m))
  return [found[k] for k in sorted(found)]


def split_files(files: Sequence[pathlib.Path],
                val_fraction: float) -> tuple[list[pathlib.Path], list[pathlib.Path]]:
  """Splits `files` into (train, val) by a stable hash of each file's path relative to their root.

  File f goes to val iff u(f) < val_fraction, where u(f) in [0, 1) is the first 8 bytes of
  sha256(relative path) as a fraction; so about `val_fraction` of the files go to val, and a file
  keeps its side when other files are added. With >= 2 files each side gets at least one: if val
  came out empty the file with the smallest u moves there, if train did the one with the largest u.

  A single file cannot be split by file: it is returned as ([file], []), and the pipeline holds out
  the last `val_fraction` of that file's tokens instead (`packing.split_tokens`).

  Args:
    files: the corpus files, e.g. from `builtin_corpus_files()` or `text_files()`.
    val_fraction: in (0, 1).

  Returns:
    (train_files, val_files), each in the order of `files`; disjoint, together all of `files`.
  """
  files = list(files)
  if len(files) < 2:
    split_keys([], val_fraction)   # checks val_fraction
    return files, []
  absolute = [os.path.abspath(f) for f in files]
  # The root is the deepest common directory, so a corpus copied elsewhere splits the same way.
  root = os.path.commonpath([os.path.dirname(a) for a in absolute])
  in_val = split_keys([pathlib.Path(os.path.relpath(a, root)).as_posix() for a in absolute],
                      val_fraction)
  train = [f for f, v in zip(files, in_val) if not v]
  val = [f for f, v in zip(files, in_val) if v]
  return train, val


def split_keys(keys: Sequence[str], val_fraction: float) -> list[bool]:
  """Which of `keys` go to val: key k iff u(k) < val_fraction (the rule of `split_files`), with
  one key moved to each side that came out empty when there are >= 2 keys.

  Documents of jsonl, parquet and hf_disk sources are split by the key str(i), i their position
  among the source's documents (data/sources.py)."""
  if not 0 < val_fraction < 1:
    raise ConfigError(f"data.val_fraction={val_fraction!r}: allowed: a float in (0, 1)")
  if len(keys) < 2:
    return [False] * len(keys)
  u = [_unit_hash(k) for k in keys]
  in_val = [x < val_fraction for x in u]
  if not any(in_val):
    in_val[min(range(len(keys)), key=u.__getitem__)] = True
  if all(in_val):
    in_val[max(range(len(keys)), key=u.__getitem__)] = False
  return in_val


def _unit_hash(key: str) -> float:
  """A stable value in [0, 1) for `key` (unlike hash(), the same in every process)."""
  digest = hashlib.sha256(key.encode("utf-8")).digest()
  return int.from_bytes(digest[:8], "big") / 2.0**64

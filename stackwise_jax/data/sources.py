"""Where a run's documents come from (design §10): `SOURCES`, one row per `data.source`, which
config validation (its allowed names and data.paths), the corpus (data/packing.py), `prepare` and
README's data table (a test checks it) all read; and the readers of the row sources.

A row source's documents are its rows' `data.text_field`, strings: the rows of jsonl or parquet
files, or of a `datasets.save_to_disk` directory. Rows are read in order: the files of `data.paths`
sorted (as for text files), each file's rows in its order. A row whose text is empty holds no
document: it is counted and skipped. A jsonl line that is not JSON, lacks the field, or holds a
non-string there is a ConfigError naming `file:line`, or with `data.skip_bad_records` is counted and
skipped (blank lines are ignored). parquet and `datasets` are imported only for their sources (the
`[text]` extra).
"""
from collections.abc import Callable
import dataclasses
import json
import os
import pathlib

from stackwise_jax.data import corpus
from stackwise_jax.errors import ConfigError


@dataclasses.dataclass
class Documents:
  """A row source's documents, in order.

  Attributes:
    texts: the documents' texts (none empty).
    files: the files (or the one directory) they came from.
    bad: rows skipped as bad (data.skip_bad_records).
    empty: rows skipped because their text is empty.
  """
  texts: list[str]
  files: list[pathlib.Path]
  bad: int = 0
  empty: int = 0


@dataclasses.dataclass(frozen=True)
class Source:
  """One `data.source`.

  Attributes:
    reads: "files" (a document a file: `read(data)` gives the files, split by file), "rows" (a
      document a row: `read(data)` gives `Documents`, split by position) or "records" (the packed
      records `prepare` wrote, opened by data/prepared.py; no `read`).
    paths: what data.paths holds: "any" (it is not read), "files" (files or globs, at least one)
      or "directory" (exactly one).
    read: (a config's `data` group) -> the documents; ConfigError for missing files, a bad row
      (unless data.skip_bad_records), no text field, a missing `[text]` extra.
  """
  reads: str
  paths: str
  read: Callable | None = None


def _jsonl(data) -> Documents:
  docs = Documents([], corpus.text_files(data.paths))
  for path in docs.files:
    _read_jsonl(path, data.text_field, data.skip_bad_records, docs)
  return docs


def _parquet(data) -> Documents:
  docs = Documents([], corpus.text_files(data.paths))
  for path in docs.files:
    _add_rows(docs, _parquet_column(path, data.text_field), path, data.text_field,
              data.skip_bad_records)
  return docs


def _hf_disk(data) -> Documents:
  directory = data.paths[0]
  docs = Documents([], [pathlib.Path(directory)])
  _add_rows(docs, _dataset_column(directory, data.text_field), directory, data.text_field,
            data.skip_bad_records)
  return docs


# Every data.source, in README's order.
SOURCES = {
    "builtin": Source("files", "any", lambda data: corpus.builtin_corpus_files()),
    "text": Source("files", "files", lambda data: corpus.text_files(data.paths)),
    "jsonl": Source("rows", "files", _jsonl),
    "parquet": Source("rows", "files", _parquet),
    "hf_disk": Source("rows", "directory", _hf_disk),
    "array_record": Source("records", "directory"),
}
DOCUMENT_SOURCES = tuple(name for name, s in SOURCES.items() if s.reads != "records")
PREPARED_SOURCES = tuple(name for name, s in SOURCES.items() if s.reads == "records")


def _bad(docs: Documents, skip: bool, where: str, problem: str, field: str) -> None:
  if not skip:
    raise ConfigError(f"{where}: {problem}; allowed: a string field data.text_field={field!r} "
                      "in every row, or data.skip_bad_records=True to skip such rows")
  docs.bad += 1


def _add(docs: Documents, text: str) -> None:
  if text:
    docs.texts.append(text)
  else:
    docs.empty += 1


def _read_jsonl(path: pathlib.Path, field: str, skip: bool, docs: Documents) -> None:
  with open(path, "rb") as f:
    for number, line in enumerate(f, start=1):
      if not line.strip():
        continue
      where = f"{path}:{number}"
      try:
        row = json.loads(line)
      except ValueError as e:   # JSONDecodeError, or bytes that are not UTF-8
        _bad(docs, skip, where, f"not a JSON line ({e})", field)
        continue
      if not isinstance(row, dict) or field not in row:
        has = f"fields {', '.join(map(repr, row))}" if isinstance(row, dict) else type(row).__name__
        _bad(docs, skip, where, f"no field {field!r} (the line has {has})", field)
      elif not isinstance(row[field], str):
        _bad(docs, skip, where, f"field {field!r} is {type(row[field]).__name__}, not a string",
             field)
      else:
        _add(docs, row[field])


def _add_rows(docs: Documents, values, where, field: str, skip: bool) -> None:
  """Adds a column's values; a null or non-string one is a bad row `where` row i (from 0)."""
  for i, value in enumerate(values):
    if isinstance(value, str):
      _add(docs, value)
    else:
      _bad(docs, skip, f"{where} row {i}",
           f"field {field!r} is {type(value).__name__}, not a string", field)


def _require(module: str, source: str):
  try:
    return __import__(module, fromlist=["_"])
  except ImportError as e:
    raise ConfigError(f"data.source={source!r}: needs {module.split('.')[0]}, in the [text] extra "
                      "(pip install -e '.[text]')") from e


def _parquet_column(path: pathlib.Path, field: str) -> list:
  pq = _require("pyarrow.parquet", "parquet")
  try:
    table = pq.ParquetFile(path)
  except Exception as e:   # pyarrow raises ArrowInvalid (not an OSError) for a non-parquet file
    raise ConfigError(f"data.paths: {path}: not a readable parquet file ({e})") from e
  columns = table.schema_arrow.names
  if field not in columns:
    raise ConfigError(f"data.text_field={field!r}: {path} has no such column; its columns: "
                      f"{', '.join(columns)}")
  return table.read(columns=[field]).column(field).to_pylist()


def _dataset_column(directory: str, field: str) -> list:
  datasets = _require("datasets", "hf_disk")
  if not os.path.isdir(directory):
    raise ConfigError(f"data.paths: {directory!r}: no such directory (data.source='hf_disk' reads "
                      "a directory written by datasets' save_to_disk)")
  try:
    ds = datasets.load_from_disk(directory)
  except (FileNotFoundError, ValueError) as e:
    raise ConfigError(f"data.paths: {directory!r}: not a directory written by datasets' "
                      f"save_to_disk ({e})") from e
  if isinstance(ds, datasets.DatasetDict):
    if len(ds) != 1:
      raise ConfigError(f"data.paths: {directory!r} holds the splits {', '.join(ds)}; allowed: "
                        "one split's directory, e.g. " + repr(os.path.join(directory, next(iter(ds)))))
    ds = next(iter(ds.values()))
  if field not in ds.column_names:
    raise ConfigError(f"data.text_field={field!r}: {directory} has no such column; its columns: "
                      f"{', '.join(ds.column_names)}")
  return list(ds[field])

"""Reading datasets from disk (or the hub) into canonical conversations.

A dataset spec is a dict or ConfigDict; these keys are read (others, such as a
mixture weight, are left to their owners):

  path           a file (.jsonl, .json, .parquet, .csv), a glob of them, a
                 directory of them, a directory written by ``datasets``'
                 ``save_to_disk``, or else a Hugging Face hub dataset name
  format         alpaca | sharegpt | messages | text | pairwise | label | auto
                 (default auto: decided from the first row's fields)
  columns        {canonical field: the file's column name}
  system_prompt  the system message for rows that have none
  split          the split of a saved DatasetDict or hub dataset (default train)

JSON and JSON Lines are parsed here, line by line, with Python's ``json``:
that is what lets an error name the line (``data.jsonl:17: invalid JSON …``),
a bad byte (``data.jsonl: not UTF-8 at byte 5120``) or an empty file, where
pyarrow's reader would raise a stack trace without a line number, and would
reject files whose rows vary in type (``input`` null in one row, a string in
the next). Parquet, CSV, saved datasets and hub datasets go through
``datasets``, which already knows those formats; their rows are named
``FILE:row N`` (1-based). Rows are streamed: ``iter_examples`` holds one row
at a time, so a large pre-training corpus does not have to fit in memory.
"""
from __future__ import annotations

import csv
import glob
import json
import os
from typing import Any, Iterator, Mapping

from jaxsft.data import formats
from jaxsft.data.formats import Conversation

FILE_TYPES = (".jsonl", ".json", ".parquet", ".csv")
SPEC_KEYS = ("path", "format", "columns", "system_prompt", "split")


def iter_examples(spec: Mapping[str, Any]) -> Iterator[Conversation]:
  """Stream the dataset described by ``spec`` (see the module doc) as
  ``Conversation``s, in file order. Errors are raised when the bad row is reached."""
  spec = _plain(spec)
  path = spec.get("path")
  if not path or not isinstance(path, str):
    raise ValueError(f"dataset spec {spec}: 'path' (a file, glob, directory or hub name) is "
                     "required")
  fmt = spec.get("format") or "auto"
  columns = _plain(spec.get("columns") or {})
  formats.check_columns(fmt, columns, where=f"dataset {path}")
  system_prompt = spec.get("system_prompt") or None
  if system_prompt is not None and not isinstance(system_prompt, str):
    raise ValueError(f"dataset {path}: system_prompt must be a string")
  if system_prompt and fmt == "text":
    raise ValueError(f"dataset {path}: system_prompt is set, but format text has no prompt to "
                     "put it in; remove it or use a chat format")
  for source, row in iter_rows(path, spec.get("split")):
    if fmt == "auto":
      fmt = formats.detect_format(row, columns, source)
      formats.check_columns(fmt, columns, where=f"dataset {path} (format detected: {fmt})")
      if system_prompt and fmt == "text":
        raise ValueError(f"dataset {path}: system_prompt is set, but its rows are plain text "
                         f"(format detected from {source}), which have no prompt")
    yield formats.to_conversation(row, fmt, source, columns, system_prompt)


def load_examples(spec: Mapping[str, Any]) -> list[Conversation]:
  """All of ``iter_examples(spec)`` as a list."""
  return list(iter_examples(spec))


def locate(path: str) -> tuple[str, Any]:
  """Where ``path``'s rows come from, without reading them: ``("saved", dir)``,
  ``("files", [file, ...])`` or ``("hub", name)``. Raises ValueError for a
  local path that does not exist, so configs can be checked up front."""
  if os.path.isdir(path):
    if _is_saved_dataset(path):
      return "saved", path
    files = sorted(f for f in glob.glob(os.path.join(path, "**", "*"), recursive=True)
                   if f.endswith(FILE_TYPES) and os.path.isfile(f))
    if not files:
      raise ValueError(f"{path}: a directory with no {'/'.join(FILE_TYPES)} files and no "
                       "saved dataset (dataset_info.json / dataset_dict.json) in it")
    return "files", files
  if os.path.isfile(path):
    return "files", [path]
  if glob.has_magic(path):
    files = sorted(f for f in glob.glob(path, recursive=True) if os.path.isfile(f))
    if not files:
      raise ValueError(f"{path}: no files match this pattern")
    return "files", files
  if looks_local(path):
    raise ValueError(f"{path}: no such file or directory")
  return "hub", path


def iter_rows(path: str, split: str | None = None) -> Iterator[tuple[str, dict]]:
  """``(source, row)`` for every row under ``path``; ``source`` is
  ``FILE:LINE`` for JSON Lines and ``FILE:row N`` otherwise."""
  kind, where = locate(path)
  if kind == "saved":
    yield from _read_saved(where, split)
  elif kind == "hub":
    yield from _read_hub(where, split)
  else:
    for f in where:
      yield from read_file(f)


def read_file(path: str) -> Iterator[tuple[str, dict]]:
  """``(source, row)`` for each row of one data file, chosen by its extension."""
  ext = os.path.splitext(path)[1].lower()
  if ext == ".jsonl":
    yield from _read_jsonl(path)
  elif ext == ".json":
    yield from _read_json(path)
  elif ext in (".parquet", ".csv"):
    yield from _read_tabular(path, ext[1:])
  else:
    raise ValueError(f"{path}: unknown file type {ext!r}; use one of {FILE_TYPES}")


def _plain(x: Any) -> dict:
  """A dict from a dict or ConfigDict."""
  return x.to_dict() if hasattr(x, "to_dict") else dict(x)


def looks_local(path: str) -> bool:
  """Whether ``path`` is meant as a local path rather than a hub name such as
  ``tatsu-lab/alpaca`` (a hub name has at most one slash and no extension)."""
  return (path.startswith((".", "/", "~")) or path.count("/") > 1
          or (os.sep != "/" and os.sep in path) or path.lower().endswith(FILE_TYPES))


def _is_saved_dataset(path: str) -> bool:
  return any(os.path.exists(os.path.join(path, f))
             for f in ("dataset_dict.json", "dataset_info.json", "state.json"))


def _decode(raw: bytes, path: str, offset: int, line: int | None = None) -> str:
  try:
    return raw.decode("utf-8")
  except UnicodeDecodeError as e:
    where = f" (line {line})" if line else ""
    raise ValueError(f"{path}: not UTF-8 at byte {offset + e.start}{where}; re-encode the file as "
                     "UTF-8 (e.g. iconv -f GB18030 -t UTF-8)") from None


def _read_jsonl(path: str) -> Iterator[tuple[str, dict]]:
  rows = 0
  offset = 0
  with open(path, "rb") as f:
    for lineno, raw in enumerate(f, 1):
      line = _decode(raw, path, offset, lineno)
      offset += len(raw)
      if lineno == 1:
        line = line.removeprefix("\ufeff")  # a byte-order mark from Windows editors
      if not line.strip():
        continue
      try:
        row = json.loads(line.rstrip("\r\n"))  # so the error's column is on this line
      except json.JSONDecodeError as e:
        if rows == 0 and path.endswith(".json"):
          _reject_single_object(path)
        raise ValueError(f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno}); each "
                         "line must hold one complete JSON object") from None
      if not isinstance(row, dict):
        raise ValueError(f"{path}:{lineno}: expected a JSON object with named fields, got "
                         f"{type(row).__name__}")
      rows += 1
      yield f"{path}:{lineno}", row
  if rows == 0:
    raise ValueError(f"{path}: no rows (the file is empty)")


def _read_json(path: str) -> Iterator[tuple[str, dict]]:
  """A .json file holds a JSON array of rows, or (as often) JSON Lines."""
  with open(path, "rb") as f:
    head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
  if not head.startswith(b"["):
    rows = _read_jsonl(path)
    first, second = next(rows), next(rows, None)
    values = list(first[1].values())
    if (second is None and len(values) > 1 and all(isinstance(v, list) for v in values)
        and len({len(v) for v in values}) == 1 and len(values[0]) > 1):
      raise ValueError(f"{path}: holds columns (fields {sorted(first[1])[:8]}, each a list of "
                       f"{len(values[0])} values), not rows; write a JSON array of row objects, "
                       "or JSON Lines (one object per line)")
    yield first
    if second is not None:
      yield second
      yield from rows
    return
  with open(path, "rb") as f:
    text = _decode(f.read(), path, 0).removeprefix("\ufeff")
  try:
    data = json.loads(text)
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}:{e.lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
  if not data:
    raise ValueError(f"{path}: no rows (the JSON array is empty)")
  for i, row in enumerate(data, 1):
    if not isinstance(row, dict):
      raise ValueError(f"{path}:row {i}: expected a JSON object with named fields, got "
                       f"{type(row).__name__}")
    yield f"{path}:row {i}", row


def _reject_single_object(path: str) -> None:
  """Explain a .json file holding one (pretty-printed) object instead of rows."""
  with open(path, "rb") as f:
    try:
      data = json.loads(f.read().decode("utf-8", errors="replace").removeprefix("\ufeff"))
    except json.JSONDecodeError:
      return
  if isinstance(data, dict):
    raise ValueError(f"{path}: holds a single JSON object (fields {sorted(data)[:8]}), not rows; "
                     "write a JSON array of row objects, or JSON Lines (one object per line)")


def _read_tabular(path: str, kind: str) -> Iterator[tuple[str, dict]]:
  import datasets  # noqa: PLC0415  (heavy; only tabular and saved data need it)

  kwargs = {}
  if kind == "csv":
    # datasets/pandas would raise a bare UnicodeDecodeError and call a
    # header-only file a parser error; check both here first.
    header, lines, offset = None, 0, 0
    with open(path, "rb") as f:
      for lineno, raw in enumerate(f, 1):
        text = _decode(raw, path, offset, lineno)
        offset += len(raw)
        if text.strip():
          lines += 1
          header = header or next(csv.reader([text.removeprefix("\ufeff")]))
    if lines < 2:
      raise ValueError(f"{path}: no rows (a CSV file needs a header line and at least one row)")
    # Every cell as text: pandas would turn an answer "42" into an integer.
    kwargs["features"] = datasets.Features({c: datasets.Value("string") for c in header})
  try:
    ds = datasets.load_dataset(kind, data_files=[path], split="train", **kwargs)
  except Exception as e:  # noqa: BLE001  (pyarrow and pandas raise many types)
    raise ValueError(f"{path}: could not read it as {kind} ({type(e).__name__}: "
                     f"{str(e).splitlines()[0] if str(e) else ''})") from e
  yield from _dataset_rows(ds, path)


def _read_saved(path: str, split: str | None) -> Iterator[tuple[str, dict]]:
  import datasets  # noqa: PLC0415

  ds = datasets.load_from_disk(path)
  if isinstance(ds, datasets.DatasetDict):
    split = split or "train"
    if split not in ds:
      raise ValueError(f"{path}: saved dataset has no split {split!r}; its splits are "
                       f"{sorted(ds)}; set the dataset's split")
    yield from _dataset_rows(ds[split], f"{path}[{split}]")
  else:
    yield from _dataset_rows(ds, path)


def _read_hub(name: str, split: str | None) -> Iterator[tuple[str, dict]]:
  import datasets  # noqa: PLC0415

  split = split or "train"
  try:
    ds = datasets.load_dataset(name, split=split)
  except Exception as e:  # noqa: BLE001  (network, auth and missing-repo errors vary)
    raise ValueError(
        f"dataset {name!r}: no local file, directory or glob matches this path, so it was looked "
        f"up on the Hugging Face hub, which failed ({type(e).__name__}: "
        f"{str(e).splitlines()[0] if str(e) else ''}); the hub is unreachable from here. Download "
        "the dataset where the network allows (datasets.load_dataset(...).save_to_disk(DIR)) and "
        "set path to DIR, or to local jsonl/json/parquet/csv files") from e
  yield from _dataset_rows(ds, f"{name}[{split}]")


def _dataset_rows(ds, name: str) -> Iterator[tuple[str, dict]]:
  if len(ds) == 0:
    raise ValueError(f"{name}: no rows")
  for i, row in enumerate(ds, 1):
    yield f"{name}:row {i}", row

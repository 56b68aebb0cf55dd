"""Prompts from a caption source on any fsspec URL: COCO captions JSON, text lines, parquet, CSV."""

from __future__ import annotations

import csv
import io
import json
import logging
import posixpath
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pyarrow as pa
import pyarrow.parquet as pq

from storage.store import open_url

log = logging.getLogger(__name__)

DEFAULT_COLUMNS = ("caption", "prompt", "text")
SUFFIXES = (".json", ".txt", ".parquet", ".csv")


def read_captions(url: str, column: str | None = None, **storage_options: Any) -> list[str]:
    """Stripped, non-blank prompts of the caption file at `url`, in file order (format by suffix).

    `.json`: a COCO captions file (`annotations[*].caption`, as in `captions_train2014.json`) or a JSON
    list of strings. `.txt`: one prompt a line. `.parquet`/`.csv`: the column `column`, by default the
    first of "caption", "prompt", "text" that exists. Blank (or null) entries are dropped and counted.
    """
    suffix = _suffix(url)
    if suffix not in SUFFIXES:
        raise _error(url, f"unknown suffix {suffix or '(none)'!r}; use one of {', '.join(SUFFIXES)}")
    if column is not None and suffix not in (".parquet", ".csv"):
        raise _error(url, f"column={column!r} applies only to .parquet and .csv caption files")
    data = _read(url, storage_options)
    if suffix == ".parquet":
        entries = _parquet_entries(url, data, column)
    else:
        text = _decode(url, data)
        if suffix == ".json":
            entries = _json_entries(url, text)
        elif suffix == ".csv":
            entries = _csv_entries(url, text, column)
        else:
            entries = text.splitlines()
    return _clean(url, entries, count_blanks=suffix != ".txt")


def _display(url: str) -> str:
    """`url` without any `user:password@` part, safe to put in a message."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


def _error(url: str, what: str) -> ValueError:
    """One-line ValueError naming the caption file and what is wrong with it."""
    return ValueError(" ".join(f"captions file {_display(url)}: {what}".splitlines()))


def _suffix(url: str) -> str:
    """Lower-case suffix of the path part of `url` ('' if none)."""
    path = urlsplit(url).path if "://" in url else url
    return posixpath.splitext(path.rstrip("/"))[1].lower()


def _read(url: str, storage_options: dict[str, Any]) -> bytes:
    """All bytes at `url`; FileNotFoundError or ValueError (one line, no storage options) on failure."""
    try:
        with open_url(url, "rb", **storage_options) as f:
            return f.read()
    except FileNotFoundError as e:
        raise FileNotFoundError(f"captions file {_display(url)}: not found") from e
    except (OSError, ValueError) as e:
        detail = str(e).splitlines()[0][:200] if str(e) else ""
        raise _error(url, f"cannot read it ({type(e).__name__}: {detail})") from e


def _decode(url: str, data: bytes) -> str:
    """UTF-8 text of `data` (a leading byte-order mark is dropped)."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise _error(url, f"not UTF-8 text (byte {e.start})") from e


def _json_entries(url: str, text: str) -> list[Any]:
    """Captions of a COCO captions object, or the items of a JSON list of strings."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise _error(url, f"invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from e
    if isinstance(obj, list):
        for i, item in enumerate(obj):
            if not isinstance(item, str):
                raise _error(url, f"JSON list item {i} is {type(item).__name__}, not a string")
        return obj
    annotations = obj.get("annotations") if isinstance(obj, dict) else None
    coco = isinstance(annotations, list) and all(isinstance(a, dict) and "caption" in a for a in annotations)
    if not coco:
        raise _error(url, 'no "annotations" with "caption" (COCO captions schema), nor a list of strings')
    captions = [a["caption"] for a in annotations]
    for i, caption in enumerate(captions):
        if not isinstance(caption, str):
            raise _error(url, f'annotation {i}: "caption" is {type(caption).__name__}, not a string')
    return captions


def _pick_column(url: str, names: Sequence[str], column: str | None) -> str:
    """`column` if present, else the first default column present; ValueError listing the columns."""
    found = ", ".join(repr(n) for n in names[:20]) + (", ..." if len(names) > 20 else "")
    if column is not None:
        if column not in names:
            raise _error(url, f"no column {column!r} (columns: {found or 'none'})")
        return column
    for name in DEFAULT_COLUMNS:
        if name in names:
            return name
    wanted = ", ".join(repr(n) for n in DEFAULT_COLUMNS)
    raise _error(url, f"no column {wanted} (columns: {found or 'none'}); pass column=")


def _parquet_entries(url: str, data: bytes, column: str | None) -> list[Any]:
    """Values of the prompt column of a parquet file."""
    try:
        parquet = pq.ParquetFile(io.BytesIO(data))
        name = _pick_column(url, parquet.schema_arrow.names, column)
        values = parquet.read(columns=[name]).column(name).to_pylist()
    except (pa.ArrowException, OSError) as e:
        detail = str(e).splitlines()[0][:200] if str(e) else ""
        raise _error(url, f"not a readable parquet file ({type(e).__name__}: {detail})") from e
    for i, value in enumerate(values):
        if value is not None and not isinstance(value, str):
            raise _error(url, f"column {name!r} holds {type(value).__name__} at row {i}, not text")
    return values


def _csv_entries(url: str, text: str, column: str | None) -> list[str]:
    """Values of the prompt column of a CSV file with a header row (all fields read as text)."""
    try:
        rows = [row for row in csv.reader(io.StringIO(text, newline="")) if row]
    except csv.Error as e:
        raise _error(url, f"invalid CSV: {e}") from e
    if not rows:
        raise _error(url, "empty CSV (no header row)")
    header, body = rows[0], rows[1:]
    index = header.index(_pick_column(url, header, column))
    for n, row in enumerate(body, start=1):
        if len(row) != len(header):
            raise _error(url, f"CSV row {n} has {len(row)} fields, the header has {len(header)}")
    return [row[index] for row in body]


def _clean(url: str, entries: Sequence[str | None], count_blanks: bool) -> list[str]:
    """Stripped non-blank entries; blanks are logged when `count_blanks`; ValueError if none remain."""
    prompts = [e.strip() for e in entries if e is not None and e.strip()]
    if not prompts:
        held = f"{len(entries)} entries, all blank or null" if entries else "the file holds none"
        raise _error(url, f"no prompts ({held})")
    dropped = len(entries) - len(prompts)
    if count_blanks and dropped:
        total = len(entries)
        log.warning("captions file %s: dropped %d blank or null of %d entries", _display(url), dropped, total)
    return prompts

"""WebDataset (1.0.2) shards on any fsspec URL: byte-stable writes, strict reads, no pickle."""

from __future__ import annotations

import hashlib
import io
import json
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import IO, Any

import numpy as np
import webdataset as wds
from PIL import Image
from webdataset.gopen import gopen_schemes  # the module's dict; `wds.gopen` is a function

from storage.manifest import ShardRecord, make_record
from storage.store import ArtifactStore, open_url

GOPEN_PROTOCOLS = ("s3", "gs", "gcs", "memory", "file")
_KEY = re.compile(r"^\d{8,}$")
_FIELD = re.compile(r"^[a-z0-9_]+(\.[a-z0-9_]+)*$")
_GOPEN_OPTIONS: dict[str, dict[str, Any]] = {}


def sample_key(index: int) -> str:
    """WebDataset key of global sample `index` (`%08d`, never a dot)."""
    if int(index) < 0:
        raise ValueError(f"sample index {index} is negative")
    return f"{int(index):08d}"


def _check_sample_key(raw: Any) -> str:
    key = sample_key(raw) if isinstance(raw, (int, np.integer)) else raw
    if not isinstance(key, str) or not _KEY.match(key):
        raise ValueError(f"sample __key__ {raw!r} is not a %08d global index (digits only, no dot)")
    return key


def _png_bytes(value: Any, where: str) -> bytes:
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    arr = np.asarray(value)
    if arr.dtype != np.uint8 or not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] in (3, 4))):
        raise TypeError(f"{where}: png needs uint8 HxW, HxWx3 or HxWx4, got {arr.dtype} {arr.shape}")
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(arr)).save(buf, format="PNG")
    return buf.getvalue()


def encode_field(name: str, value: Any, where: str = "sample") -> bytes:
    """Encode one field by its extension: npy, json, png, txt/cls; bytes pass through."""
    ext = name.rsplit(".", 1)[-1]
    if ext == "npy":
        if not isinstance(value, np.ndarray):
            raise TypeError(f"{where}: field {name!r} needs a numpy array, got {type(value).__name__}")
        buf = io.BytesIO()
        np.save(buf, value, allow_pickle=False)
        return buf.getvalue()
    if ext == "png":
        return _png_bytes(value, f"{where} field {name!r}")
    if ext == "json" and not isinstance(value, (bytes, bytearray)):
        return json.dumps(value, sort_keys=True).encode("utf-8")
    if ext in ("txt", "cls") and isinstance(value, (str, int)):
        return str(value).encode("utf-8")
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    raise TypeError(f"{where}: field {name!r} has unsupported type {type(value).__name__} (no pickle)")


def encode_sample(sample: Mapping[str, Any]) -> dict[str, Any]:
    """Validate a sample dict and encode each field to bytes for TarWriter."""
    if "__key__" not in sample:
        raise ValueError(f"sample with fields {sorted(sample)} has no __key__")
    key = _check_sample_key(sample["__key__"])
    out: dict[str, Any] = {"__key__": key}
    for name, value in sample.items():
        if name.startswith("__"):
            continue
        if name == "index":
            if int(value) != int(key):
                raise ValueError(f"sample {key}: index {value} does not match __key__")
            continue
        if not _FIELD.match(name):
            raise ValueError(f"sample {key}: field {name!r} must be lowercase [a-z0-9_.], e.g. 'noise.npy'")
        out[name] = encode_field(name, value, f"sample {key}")
    if len(out) == 1:
        raise ValueError(f"sample {key} has no data fields")
    return out


class _HashingSink:
    """Write-through wrapper counting bytes and computing SHA-256."""

    def __init__(self, f: IO[bytes]):
        self.f, self.n_bytes, self.digest = f, 0, hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        self.n_bytes += len(data)
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()


def write_shard(
    store: ArtifactStore, key: str, samples: Iterable[Mapping[str, Any]], producer_hash: str = ""
) -> ShardRecord:
    """Write samples as one tar shard at `key` (atomic, mtime=0) and return its record."""
    indices: list[int] = []
    seen: set[str] = set()
    with store.open(key, "wb") as f:
        sink = _HashingSink(f)
        with wds.TarWriter(sink, mtime=0, encoder=False) as writer:
            for sample in samples:
                encoded = encode_sample(sample)
                if encoded["__key__"] in seen:
                    raise ValueError(f"shard {key!r}: duplicate sample key {encoded['__key__']}")
                seen.add(encoded["__key__"])
                indices.append(int(encoded["__key__"]))
                writer.write(encoded)
            if not indices:
                raise ValueError(f"refusing to write empty shard {key!r}: no samples")
    return make_record(store, key, indices, sink.digest.hexdigest(), sink.n_bytes, producer_hash)


def _gopen_fsspec(url: str, mode: str = "rb", bufsize: int = 8192, **kw: Any) -> IO[bytes]:
    """gopen handler: open `url` through fsspec with the options registered for its protocol."""
    if mode != "rb":
        raise ValueError(f"{url}: shards are written with write_shard, not gopen mode {mode!r}")
    protocol = url.split("://", 1)[0]
    return open_url(url, "rb", **_GOPEN_OPTIONS.get(protocol, {}))


def register_fsspec_gopen(
    storage_options: Mapping[str, Any] | None = None, protocols: Iterable[str] = GOPEN_PROTOCOLS
) -> None:
    """Route WebDataset reads of these protocols through fsspec (file:// is opened by wds itself)."""
    for protocol in protocols:
        if storage_options is not None:
            _GOPEN_OPTIONS[protocol] = dict(storage_options)
        gopen_schemes[protocol] = _gopen_fsspec


def decode_field(name: str, value: bytes) -> Any:
    """Decode one field by its extension: npy -> array, json -> object, png -> uint8 array."""
    ext = name.rsplit(".", 1)[-1]
    if ext == "npy":
        return np.load(io.BytesIO(value), allow_pickle=False)
    if ext == "json":
        return json.loads(value.decode("utf-8"))
    if ext == "png":
        with Image.open(io.BytesIO(value)) as img:
            img = img if img.mode in ("L", "RGB", "RGBA") else img.convert("RGB")
            return np.array(img, dtype=np.uint8)
    if ext in ("txt", "cls"):
        return value.decode("utf-8")
    return value


def decode_sample(sample: Mapping[str, Any]) -> dict[str, Any]:
    """Decode a raw WebDataset sample; add `index` (int of `__key__`)."""
    key, url = sample["__key__"], sample.get("__url__")
    if not isinstance(key, str) or not _KEY.match(key):
        raise ValueError(f"shard {url}: sample key {key!r} is not a %08d global index")
    out: dict[str, Any] = {"__key__": key, "__url__": url, "index": int(key)}
    for name, value in sample.items():
        if name.startswith("__"):
            continue
        try:
            out[name] = decode_field(name, value)
        except Exception as e:
            raise ValueError(f"shard {url} sample {key}: cannot decode field {name!r}: {e}") from e
    return out


def shard_dataset(
    urls: list[str],
    storage_options: Mapping[str, Any] | None = None,
    shardshuffle: bool | int = False,
    nodesplitter: Callable | None = wds.split_by_node,
) -> wds.WebDataset:
    """A decoding WebDataset over `urls` (an IterableDataset usable with a DataLoader)."""
    if isinstance(urls, str) or not urls:
        raise ValueError(f"shard urls must be a non-empty list of URLs, got {urls!r}")
    protocols = {u.split("://", 1)[0] for u in urls if "://" in u}
    register_fsspec_gopen(storage_options, protocols=protocols & set(GOPEN_PROTOCOLS))
    dataset = wds.WebDataset(
        list(urls),
        shardshuffle=shardshuffle,
        nodesplitter=nodesplitter,
        empty_check=False,
        handler=wds.reraise_exception,
    )
    return dataset.map(decode_sample, handler=wds.reraise_exception)


def iter_shards(
    urls: list[str],
    storage_options: Mapping[str, Any] | None = None,
    shardshuffle: bool | int = False,
    nodesplitter: Callable | None = wds.split_by_node,
) -> Iterator[dict[str, Any]]:
    """Iterate decoded samples of `urls` in order; read errors raise."""
    return iter(shard_dataset(urls, storage_options, shardshuffle, nodesplitter))

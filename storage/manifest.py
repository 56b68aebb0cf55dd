"""Parquet shard manifest: one row per shard with its index range and SHA-256."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, fields
from datetime import datetime, timezone
from typing import Any

import pyarrow as pa

from storage.store import ArtifactStore

MANIFEST_SCHEMA = pa.schema(
    [
        ("shard", pa.string()),
        ("url", pa.string()),
        ("n_samples", pa.int64()),
        ("first_index", pa.int64()),
        ("last_index", pa.int64()),
        ("sha256", pa.string()),
        ("n_bytes", pa.int64()),
        ("created_at", pa.string()),
        ("producer_hash", pa.string()),
    ]
)
# Parquet schema-metadata key holding the manifest's free-form JSON metadata.
METADATA_KEY = b"dmd"


class ChecksumError(ValueError):
    """A shard's bytes do not match the SHA-256 recorded in its manifest."""


@dataclass(frozen=True)
class ShardRecord:
    """One manifest row: a shard key, its sample index range and its checksum."""

    shard: str
    url: str
    n_samples: int
    first_index: int
    last_index: int
    sha256: str
    n_bytes: int
    created_at: str
    producer_hash: str


def utc_now() -> str:
    """Current UTC time as an ISO-8601 string with seconds."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def make_record(
    store: ArtifactStore, key: str, indices: Sequence[int], sha256: str, n_bytes: int, producer_hash: str = ""
) -> ShardRecord:
    """Build a ShardRecord from known checksum and size."""
    idx = [int(i) for i in indices]
    if not idx:
        raise ValueError(f"shard {key!r} has no sample indices; refusing an empty record")
    return ShardRecord(
        shard=key,
        url=store.url(key),
        n_samples=len(idx),
        first_index=min(idx),
        last_index=max(idx),
        sha256=sha256,
        n_bytes=int(n_bytes),
        created_at=utc_now(),
        producer_hash=str(producer_hash),
    )


def shard_record(
    store: ArtifactStore, key: str, indices: Sequence[int], producer_hash: str = ""
) -> ShardRecord:
    """Describe an already written shard, reading it back for SHA-256 and size."""
    return make_record(store, key, indices, store.sha256(key), store.info(key)["size"], producer_hash)


def write_manifest(
    store: ArtifactStore, key: str, records: Iterable[ShardRecord], metadata: dict[str, Any] | None = None
) -> None:
    """Write records as a parquet manifest (atomic, sorted by first_index); `metadata` goes in the schema."""
    rows = sorted(records, key=lambda r: (r.first_index, r.shard))
    seen: set[str] = set()
    for r in rows:
        if r.shard in seen:
            raise ValueError(f"manifest {key!r} lists shard {r.shard!r} twice")
        seen.add(r.shard)
    schema = MANIFEST_SCHEMA
    if metadata is not None:
        if not isinstance(metadata, dict):
            raise TypeError(f"manifest {key!r}: metadata must be a dict, got {type(metadata).__name__}")
        try:
            blob = json.dumps(metadata, sort_keys=True, allow_nan=False).encode("utf-8")
        except (TypeError, ValueError) as e:
            raise ValueError(f"manifest {key!r}: metadata is not JSON-serialisable: {e}") from e
        schema = MANIFEST_SCHEMA.with_metadata({METADATA_KEY: blob})
    table = pa.Table.from_pylist([asdict(r) for r in rows], schema=schema)
    store.write_table(key, table)


def read_manifest(store: ArtifactStore, key: str) -> list[ShardRecord]:
    """Records of the manifest at `key`, or an empty list when it does not exist."""
    if not store.exists(key):
        return []
    table = store.read_table(key)
    names = [f.name for f in fields(ShardRecord)]
    missing = [n for n in names if n not in table.column_names]
    if missing:
        raise ValueError(f"manifest {key!r} lacks columns {missing}; was it written by write_manifest?")
    return [ShardRecord(**{n: row[n] for n in names}) for row in table.select(names).to_pylist()]


def read_manifest_metadata(store: ArtifactStore, key: str) -> dict[str, Any]:
    """The JSON metadata stored with the manifest at `key` ({} when it has none or does not exist)."""
    if not store.exists(key):
        return {}
    meta = store.read_table(key).schema.metadata or {}
    if METADATA_KEY not in meta:
        return {}
    try:
        return json.loads(meta[METADATA_KEY].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"manifest {key!r}: metadata under {METADATA_KEY!r} is not valid JSON: {e}") from e


def verify_shard(store: ArtifactStore, record: ShardRecord) -> None:
    """Raise ChecksumError naming the shard if its SHA-256 differs from the record."""
    actual = store.sha256(record.shard)
    if actual != record.sha256:
        raise ChecksumError(
            f"shard {record.shard!r}: sha256 {actual} does not match manifest {record.sha256}"
        )


def shard_damage(store: ArtifactStore, record: ShardRecord) -> str | None:
    """Why a manifest row's shard can't be trusted (missing, or another sha256), or None when it is intact."""
    try:
        verify_shard(store, record)
    except (ChecksumError, FileNotFoundError) as err:
        return str(err)
    return None


def verify_manifest(store: ArtifactStore, records: Iterable[ShardRecord]) -> None:
    """Verify every shard; raise one ChecksumError naming all mismatching shards."""
    errors: list[str] = []
    for record in records:
        try:
            verify_shard(store, record)
        except ChecksumError as e:
            errors.append(str(e))
    if errors:
        raise ChecksumError(f"{len(errors)} shard(s) failed verification: " + "; ".join(errors))

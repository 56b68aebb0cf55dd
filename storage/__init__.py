"""storage: every byte that leaves the process (artifact store, WebDataset shards, parquet manifests)."""

from storage.manifest import (
    ChecksumError,
    ShardRecord,
    make_record,
    read_manifest,
    read_manifest_metadata,
    shard_record,
    verify_manifest,
    verify_shard,
    write_manifest,
)
from storage.shards import (
    decode_sample,
    encode_sample,
    iter_shards,
    register_fsspec_gopen,
    sample_key,
    shard_dataset,
    write_shard,
)
from storage.store import ArtifactStore, check_key, open_url
from storage.stream import ShardReadError, ShardStream

__all__ = [
    "ArtifactStore",
    "ChecksumError",
    "ShardReadError",
    "ShardRecord",
    "ShardStream",
    "check_key",
    "decode_sample",
    "encode_sample",
    "iter_shards",
    "make_record",
    "open_url",
    "read_manifest",
    "read_manifest_metadata",
    "register_fsspec_gopen",
    "sample_key",
    "shard_dataset",
    "shard_record",
    "verify_manifest",
    "verify_shard",
    "write_manifest",
    "write_shard",
]

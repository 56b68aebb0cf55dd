"""storage: every byte that leaves the process (artifact store, WebDataset shards, parquet manifests).

The names below load on first use (PEP 562), so `import storage.store` does not pull in WebDataset and torch:
the command line checks its input before anything heavy is imported."""
from __future__ import annotations

import importlib

_EXPORTS = {
    "storage.manifest": ("ChecksumError", "ShardRecord", "make_record", "read_manifest", "read_manifest_metadata",
                         "shard_damage", "shard_record", "verify_manifest", "verify_shard", "write_manifest"),
    "storage.shards": ("decode_sample", "encode_sample", "iter_shards", "register_fsspec_gopen", "sample_key",
                       "shard_dataset", "write_shard"),
    "storage.store": ("ArtifactStore", "check_key", "open_url"),
    "storage.stream": ("ShardReadError", "ShardStream"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str):
    if name not in _MODULE_OF:
        raise AttributeError(f"module 'storage' has no attribute {name!r}")
    value = getattr(importlib.import_module(_MODULE_OF[name]), name)
    globals()[name] = value
    return value

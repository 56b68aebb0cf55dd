"""Where each stage's artifacts live inside a run folder `<root>/<run_name>/`."""
from __future__ import annotations

import os
import re

from storage.store import ArtifactStore

CONFIG = "config.json"
TEACHER = "teacher"
PAIRS_DIR = "pairs"
PAIRS_MANIFEST = "pairs/manifest.parquet"
REAL_DIR = "real"
REAL_MANIFEST = "real/manifest.parquet"
REAL_REPORT = "real/report.json"
CHECKPOINTS = "distill/checkpoints"
METRICS = "distill/metrics.parquet"
EXPORT = "export"
EVAL_DIR = "eval"
RESULTS = "eval/results.parquet"
SUMMARY = "eval/summary.json"
EVAL_GRID = "eval/grid.png"
EVAL_COMPARE = "eval/compare.png"
_RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def root_store(root: str, **storage_options) -> ArtifactStore:
    """The store of the artifact root itself (caches shared by its runs); a local path becomes a file:// URL."""
    if "://" not in root:
        root = "file://" + os.path.abspath(root)
    return ArtifactStore(root.rstrip("/"), **storage_options)


def run_store(root: str, run_name: str, **storage_options) -> ArtifactStore:
    """The store of one run; a plain local path (relative or absolute) becomes a file:// URL."""
    if not _RUN_NAME.match(run_name or ""):
        raise ValueError(f"run_name {run_name!r}: use letters, digits, '.', '_' or '-'")
    return root_store(root, **storage_options).child(run_name)


# The export folder holds only what a pipeline loads (byte-reproducible): its marker sits beside it.
EXPORT_MARKER = "export.complete.json"
LEGACY_EXPORT_MARKER = "export/_complete.json"


def done_marker(stage: str) -> str:
    """Key of the marker a stage writes last; its presence means the stage is complete."""
    return EXPORT_MARKER if stage == EXPORT else f"{stage}/_complete.json"


def shard_key(shard_id: int) -> str:
    return f"pairs/shard-{shard_id:06d}.tar"


def real_shard_key(shard_id: int) -> str:
    return f"real/shard-{shard_id:06d}.tar"


def checkpoint_prefix(step: int, folder: str = CHECKPOINTS) -> str:
    return f"{folder}/step-{step:08d}"


def compile_cache_key(name: str) -> str:
    """torch's compile cache artifacts of a distill run, one file per (torch, GPU, config, compile mode)."""
    return f"distill/compile-cache/{name}.bin"


def sample_grid_key(step: int) -> str:
    return f"distill/samples/step-{step:08d}.png"


def checkpoint_steps(store: ArtifactStore, folder: str = CHECKPOINTS) -> list[int]:
    """Steps of the complete checkpoints (those whose marker was written) in `folder`, ascending."""
    steps = set()
    for key in store.ls(folder):
        m = re.match(rf"^{re.escape(folder)}/step-(\d+)/_complete\.json$", key)
        if m:
            steps.add(int(m.group(1)))
    return sorted(steps)


def list_runs(root: str, **storage_options) -> list[str]:
    """Names of the runs under a root (folders holding a saved config)."""
    return [k.rsplit("/", 1)[0] for k in root_store(root, **storage_options).glob(f"*/{CONFIG}")]

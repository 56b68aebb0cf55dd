"""Shared pieces of the reliability suite: the tiny pipeline as a subprocess, snapshots, the figures file."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional

REPO = Path(__file__).resolve().parents[2]
SOAK = os.environ.get("DMD_SOAK") == "1"
PRESET = "digits-tiny"
STAGES = "teacher,pairs,distill,export"
# Written by every module of the suite; docs/reliability.md quotes the figures of its last run.
FIGURES = Path(os.environ.get("DMD_RELIABILITY_FIGURES", "")) if os.environ.get("DMD_RELIABILITY_FIGURES") else None


def record_figures(section: str, **counts) -> None:
    """Merge `counts` into the figures JSON (when DMD_RELIABILITY_FIGURES names a file)."""
    if FIGURES is None:
        return
    data = json.loads(FIGURES.read_text()) if FIGURES.exists() else {}
    data[f"{section}-soak" if SOAK else section] = counts
    FIGURES.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def pipeline_command(root: Path, run_name: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "flows.cli", "run", "--preset", PRESET, "--root", str(root), "--run-name",
            run_name, "--stages", STAGES, *extra]


def env_for(api_url: Optional[str]) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    if api_url:
        env["PREFECT_API_URL"] = api_url
    return env


def start(cmd: list[str], env: dict, log: Path) -> subprocess.Popen:
    """The command in its own process group (so a kill takes its children too), output to `log`."""
    with open(log, "ab") as out:
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def kill_group(proc: subprocess.Popen) -> bool:
    """SIGKILL the process group; True when the process was still running."""
    alive = proc.poll() is None
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(30)
    return alive


def wait_for(proc: subprocess.Popen, ready: Callable[[], bool], timeout: float = 300, poll: float = 0.02) -> bool:
    """Poll until `ready()` (True) or the process ends (False)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if ready():
            return True
        if proc.poll() is not None:
            return ready()
        time.sleep(poll)
    raise TimeoutError("the pipeline neither reached the kill point nor ended")


def files(folder: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under `folder`."""
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()} if folder.exists() else {}


def temporaries(folder: Path) -> list[str]:
    """Files a killed writer could leave: atomic-write temporaries."""
    return sorted(str(p) for p in folder.rglob(".dmd-tmp-*"))


# rng.safetensors also holds the process-wide torch RNG, which depends on what else ran in the process.
UNSTABLE = ("rng.safetensors", "_complete.json")


def outputs(run: Path) -> dict[str, str]:
    """The bytes a run must reproduce: pair shards, checkpoints (weights, optimizer and stream state), export/."""
    keep = {}
    for rel, digest in files(run).items():
        if rel.startswith("pairs/shard-") or rel.startswith("export/") or (
                rel.startswith("distill/checkpoints/") and rel.rsplit("/", 1)[1] not in UNSTABLE):
            keep[rel] = digest
    return keep

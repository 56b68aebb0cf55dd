"""Kill the pairs stage midway (a separate process) and rerun it: every sample exactly once, every shard valid."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from storage import read_manifest, verify_manifest
from storage.layout import PAIRS_MANIFEST, run_store

REPO = Path(__file__).resolve().parent.parent
N, SHARD = 320, 16


@pytest.mark.slow
def test_killed_pairs_stage_resumes_to_exactly_n_samples(prefect_api, tmp_path):
    root = str(tmp_path)
    args = [sys.executable, "-m", "flows.cli", "run", "--preset", "digits-tiny", "--root", root, "--run-name", "k",
            "--stages", "teacher,pairs", "--set", f"pairs.n={N}", "--set", f"pairs.shard_size={SHARD}",
            "--set", "pairs.steps=40"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "PREFECT_API_URL": prefect_api}
    store = run_store(root, "k")
    proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if store.exists(PAIRS_MANIFEST) and len(read_manifest(store, PAIRS_MANIFEST)) >= 2:
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    before = read_manifest(store, PAIRS_MANIFEST)
    assert 2 <= len(before) < N // SHARD, f"kill did not land midway ({len(before)} shards done)"
    tokens = {r.shard: store.info(r.shard)["token"] for r in before}

    out = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    records = read_manifest(store, PAIRS_MANIFEST)
    indices = [i for r in records for i in range(r.first_index, r.last_index + 1)]
    assert len(indices) == N and sorted(indices) == list(range(N))
    assert sum(r.n_samples for r in records) == N
    verify_manifest(store, records)
    assert {r.shard: store.info(r.shard)["token"] for r in records if r.shard in tokens} == tokens, \
        "complete shards were regenerated"

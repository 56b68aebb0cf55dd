"""A real Prefect server and process worker: deploy from the repo, run deployments, rerun one stage."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from storage import read_manifest
from storage.layout import PAIRS_MANIFEST, run_store

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop(proc: subprocess.Popen) -> None:
    """SIGINT the process group (Prefect workers ignore SIGTERM for a while), then SIGKILL."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


@pytest.fixture(scope="module")
def prefect_env(tmp_path_factory):
    """Environment of a fresh `prefect server start` on a free loopback port, running for the module."""
    port = free_port()
    home = tmp_path_factory.mktemp("prefect-home")
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_UI_ENABLED": "false",
           "PYTHONPATH": str(REPO), "TQDM_DISABLE": "1"}
    log = open(home / "server.log", "w")
    server = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                               "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT,
                              start_new_session=True)
    deadline = time.time() + 180
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if server.poll() is not None or time.time() > deadline:
            stop(server)
            pytest.fail(f"prefect server did not start: {(home / 'server.log').read_text()[-2000:]}")
        time.sleep(1)
    yield env
    stop(server)
    log.close()


def prefect(env, *args, timeout=600):
    out = subprocess.run([sys.executable, "-m", "prefect", *args], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=timeout)
    assert out.returncode == 0, f"prefect {' '.join(args)} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out.stdout


def test_deploy_run_full_pipeline_then_only_evaluate(prefect_env, tmp_path):
    env = prefect_env
    prefect(env, "work-pool", "create", "dmd", "--type", "process")
    deployed = subprocess.run([sys.executable, "-m", "flows.cli", "deploy"], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=300)
    assert deployed.returncode == 0, deployed.stdout[-3000:] + deployed.stderr[-3000:]
    listing = prefect(env, "deployment", "ls")
    for name in ("full-pipeline", "pairs", "distill", "export", "evaluate", "nightly-eval"):
        assert name in listing
    gcl = prefect(env, "gcl", "inspect", "gpu")  # `dmd deploy` created the limit evaluation holds a slot of
    assert "gpu" in gcl and "limit" in gcl.lower()
    redeployed = subprocess.run([sys.executable, "-m", "flows.cli", "deploy"], cwd=REPO, env=env,
                                capture_output=True, text=True, timeout=300)
    assert redeployed.returncode == 0, redeployed.stderr[-3000:]  # an existing limit is kept, not recreated

    worker_log = open(tmp_path / "worker.log", "w")
    worker = subprocess.Popen([sys.executable, "-m", "prefect", "worker", "start", "--pool", "dmd", "--limit", "1"],
                              cwd=tmp_path, env=env, stdout=worker_log, stderr=subprocess.STDOUT,
                              start_new_session=True)
    try:
        root = str(tmp_path / "artifacts")
        params = json.dumps({"preset": "digits-tiny", "root": root, "run_name": "dep"})
        out = prefect(env, "deployment", "run", "dmd/full-pipeline", "--params", params, "--watch",
                      "--watch-timeout", "540")
        assert "Completed" in out
        store = run_store(root, "dep")
        manifest = store.read_bytes(PAIRS_MANIFEST)
        upstream = {k: (store.info(k)["token"], store.sha256(k)) for k in store.ls() if not k.startswith("eval/")}
        assert any(k.startswith("export/") for k in upstream) and read_manifest(store, PAIRS_MANIFEST)
        for key in ("eval/results.parquet", "eval/summary.json"):
            store.delete(key)

        out = prefect(env, "deployment", "run", "dmd/evaluate", "--params", params, "--watch", "--watch-timeout", "300")
        assert "Completed" in out
        assert store.read_bytes(PAIRS_MANIFEST) == manifest
        after = {k: (store.info(k)["token"], store.sha256(k)) for k in store.ls() if not k.startswith("eval/")}
        assert after == upstream, "running only evaluate rewrote an upstream artifact"
        rows = store.read_json("eval/summary.json")["rows"]
        assert {r["model"] for r in rows} == {"real", "teacher", "student"}
    finally:
        stop(worker)
        worker_log.close()

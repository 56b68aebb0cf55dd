"""The pairs stage on a local Dask cluster through prefect-dask: the manifest equals the thread pool's, shard for
shard (sha256), and a worker killed in the middle of a shard loses nothing."""
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from storage import read_manifest
from storage.layout import PAIRS_MANIFEST, run_store

OVERRIDES = ["pairs.n=48", "pairs.shard_size=6", "pairs.steps=12", "pairs.batch_size=6"]
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def kill_a_busy_worker(client, store, done: threading.Event, killed: list) -> None:
    """Once a shard is in the manifest, SIGKILL a worker process that is running a shard task."""
    pids = client.run(os.getpid)
    while not done.is_set():
        if store.exists(PAIRS_MANIFEST) and read_manifest(store, PAIRS_MANIFEST):
            busy = [addr for addr, keys in client.processing().items() if keys and addr in pids]
            if busy:
                os.kill(pids[busy[0]], signal.SIGKILL)
                killed.append(busy[0])
                return
        time.sleep(0.05)


def teacher_and_pairs(prefect_api: str, root: str, run_name: str, *overrides: str) -> subprocess.Popen:
    """`dmd run --stages teacher,pairs` in a process started as Dask starts its workers (OMP_NUM_THREADS=1): CPU
    kernels split their sums by the thread count a process starts with, and both runs (the digits-tiny teacher is
    trained in each) must compute the same bits."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PREFECT_API_URL": prefect_api,
           "PYTHONPATH": os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p)}
    cmd = [sys.executable, "-c", "from flows.cli import main; main()", "run", "--preset", "digits-tiny",
           "--root", root, "--run-name", run_name, "--stages", "teacher,pairs"]
    return subprocess.Popen(cmd + [a for o in (*OVERRIDES, *overrides) for a in ("--set", o)], cwd=REPO, env=env)


@pytest.mark.slow
def test_dask_pairs_equal_threads_and_survive_a_lost_worker(prefect_api, tmp_path):
    from distributed import Client, LocalCluster

    root = str(tmp_path)
    assert teacher_and_pairs(prefect_api, root, "threads").wait() == 0
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        store, done, killed = run_store(root, "dask"), threading.Event(), []
        killer = threading.Thread(target=kill_a_busy_worker, args=(client, store, done, killed), daemon=True)
        killer.start()
        try:
            run = teacher_and_pairs(prefect_api, root, "dask", "pairs.runner=dask",
                                    f"pairs.runner_address={cluster.scheduler_address}")
            assert run.wait() == 0
        finally:
            done.set()
            killer.join()
    assert killed, "no worker was busy to kill"
    assert_same_pairs_as_threads(root, "dask")


def assert_same_pairs_as_threads(root: str, run_name: str) -> None:
    """Run `run_name` holds exactly the 48 pairs of run "threads", shard for shard (sha256, counts, producer)."""
    threads = read_manifest(run_store(root, "threads"), PAIRS_MANIFEST)
    records = read_manifest(run_store(root, run_name), PAIRS_MANIFEST)
    assert len(records) == 8 and sum(r.n_samples for r in records) == 48
    assert [(r.shard, r.sha256, r.n_samples, r.producer_hash) for r in records] == \
           [(r.shard, r.sha256, r.n_samples, r.producer_hash) for r in threads]


def test_dask_runner_refuses_a_memory_root():
    from tasks.config import load_config
    from flows.preflight import PreflightError, preflight

    cfg = load_config("digits-tiny", overrides=["pairs.runner=dask"])
    with pytest.raises(PreflightError, match="pairs.runner=dask runs shard tasks in other processes"):
        preflight(cfg, "memory://dmd-dask", "r", None)


def test_local_cluster_workers_take_one_gpu_each():
    """Worker k of a local cluster on a host with n GPUs uses GPU k mod n; outside a worker, or with one GPU
    visible (one worker started per GPU), the current device stays."""
    from distributed import Client, LocalCluster

    from tasks.context import worker_gpu

    assert worker_gpu(2) is None  # not in a worker
    with LocalCluster(n_workers=3, threads_per_worker=1, processes=False, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        names = {info["name"]: addr for addr, info in client.scheduler_info()["workers"].items()}
        picked = {name: client.submit(lambda: (worker_gpu(2), worker_gpu(1)), workers=[addr], pure=False).result()
                  for name, addr in names.items()}
    assert picked == {0: (0, None), 1: (1, None), 2: (0, None)}

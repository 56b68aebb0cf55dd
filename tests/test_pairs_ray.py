"""The pairs stage on a local Ray cluster through prefect-ray: the manifest equals the thread pool's, shard for
shard (sha256), and a worker killed in the middle of a shard loses nothing (Ray reruns the task elsewhere)."""
import os
import signal
import threading
import time

import psutil
import pytest

from storage import read_manifest
from storage.layout import PAIRS_MANIFEST, run_store
from tests.test_pairs_dask import REPO, assert_same_pairs_as_threads, teacher_and_pairs

pytestmark = pytest.mark.slow
TASK_TITLE = "ray::pairs-shard"  # Ray names a worker process after the task it runs (prefect-ray: the task name)


def kill_a_busy_worker(store, done: threading.Event, killed: list) -> None:
    """Once a shard is in the manifest, SIGKILL a Ray worker process that is running a shard task."""
    while not done.is_set():
        if store.exists(PAIRS_MANIFEST) and read_manifest(store, PAIRS_MANIFEST):
            for proc in psutil.process_iter(["pid", "cmdline"]):
                if (proc.info["cmdline"] or [""])[0].startswith(TASK_TITLE):
                    os.kill(proc.info["pid"], signal.SIGKILL)
                    killed.append(proc.info["pid"])
                    return
        time.sleep(0.05)


def test_ray_pairs_equal_threads_and_survive_a_lost_worker(prefect_api, tmp_path, monkeypatch):
    import ray

    root = str(tmp_path)
    assert teacher_and_pairs(prefect_api, root, "threads").wait() == 0
    # The cluster's workers import the project and report to the same Prefect server, one thread each.
    for name, value in {"PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p),
                        "PREFECT_API_URL": prefect_api, "OMP_NUM_THREADS": "1", "RAY_USAGE_STATS_ENABLED": "0"}.items():
        monkeypatch.setenv(name, value)
    context = ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        address = context.address_info["gcs_address"]
        store, done, killed = run_store(root, "ray"), threading.Event(), []
        killer = threading.Thread(target=kill_a_busy_worker, args=(store, done, killed), daemon=True)
        killer.start()
        try:
            # device=auto on this CPU-only host: the tasks must not ask Ray for a GPU it does not have
            run = teacher_and_pairs(prefect_api, root, "ray", "pairs.runner=ray", f"pairs.runner_address={address}",
                                    "device=auto")
            assert run.wait(timeout=600) == 0
        finally:
            done.set()
            killer.join()
    finally:
        ray.shutdown()
    assert killed, "no worker was busy to kill"
    assert_same_pairs_as_threads(root, "ray")

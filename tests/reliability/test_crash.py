"""Crash anywhere: SIGKILL the tiny pipeline's process group right after chosen files appear and at seeded random
moments, rerun it to completion, and get exactly the bytes of an uninterrupted run (DMD_SOAK=1: 20+ kills)."""
import random
import time

import pytest

from storage import read_manifest, verify_shard
from storage.layout import PAIRS_MANIFEST, run_store
from storage.stream import read_shard
from tests.reliability.conftest import run_to_end
from tests.reliability.harness import (SOAK, env_for, kill_group, outputs, pipeline_command, record_figures, start,
                                       temporaries, wait_for)

pytestmark = pytest.mark.slow
N_PAIRS = 96  # digits-tiny: pairs.n
# Kill points in pipeline order, each right after the file appears: a shard, a marker, a checkpoint file, a marker.
FILE_EVENTS = ["pairs/shard-000000.tar", "pairs/_complete.json",
               "distill/checkpoints/step-00000002/ema.safetensors", "distill/_complete.json"]
RANDOM_KILLS = 16 if SOAK else 2


def check_complete(run, expected):
    """Exactly N unique pairs, every shard verifies, no temporary visible, the baseline's bytes."""
    store = run_store(str(run.parent), run.name)
    records = read_manifest(store, PAIRS_MANIFEST)
    indices = []
    for rec in records:
        verify_shard(store, rec)
        indices += [s["index"] for s in read_shard(store, rec)]
    assert sorted(indices) == list(range(N_PAIRS))
    assert temporaries(run) == []
    got = outputs(run)
    assert got == expected, sorted(k for k in set(got) | set(expected) if got.get(k) != expected.get(k))


def crashed_flow_runs(api_url, run):
    """States of the flow runs that worked on `run` (tagged with its folder)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags

    from flows.crashed import run_tag

    tag = run_tag(run_store(str(run.parent), run.name).root_url)
    with get_client(sync_client=True) as client:
        return [r.state.type.value for r in client.read_flow_runs(flow_run_filter=FlowRunFilter(
            tags=FlowRunFilterTags(all_=[tag])))]


def test_kills_at_files_and_random_moments_recover_bit_identically(prefect_api, baseline, tmp_path):
    _, _, expected, seconds = baseline
    env, rng = env_for(prefect_api), random.Random(20261125)
    tried = survived = 0
    plan = [("file", key) for key in FILE_EVENTS] + [("random", None)] * RANDOM_KILLS
    root, chain = tmp_path / "chain-0", 0
    for i, (kind, key) in enumerate(plan):
        run = root / "crash"
        proc = start(pipeline_command(root, "crash"), env, tmp_path / "log.txt")
        if kind == "file":
            reached = wait_for(proc, lambda: (run / key).exists())
        else:  # a moment within an uninterrupted run's length (imports and the flow's start included)
            time.sleep(rng.uniform(3.0, 0.8 * seconds))
            reached = True
        killed = reached and kill_group(proc)
        tried += killed
        if not killed:  # the run ended before the kill point: it must be complete and right
            assert proc.returncode == 0
        if not killed or (kind == "random" and i % 5 == 4):  # check the chain, then start a fresh run folder
            if killed:
                run_to_end(pipeline_command(root, "crash"), env, tmp_path / "log.txt")
            check_complete(run, expected)
            survived, chain, root = tried, chain + 1, tmp_path / f"chain-{chain + 1}"
    run_to_end(pipeline_command(root, "crash"), env, tmp_path / "log.txt")
    check_complete(root / "crash", expected)
    survived = tried
    states = crashed_flow_runs(prefect_api, root / "crash")
    assert "RUNNING" not in states and "CRASHED" in states, states
    record_figures("crash", kills_tried=tried, kills_survived=survived, run_folders_compared=chain + 1)
    assert tried >= (20 if SOAK else 5)

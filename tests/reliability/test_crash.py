"""Crash anywhere: SIGKILL the tiny pipeline's process group right after chosen files appear and at seeded random
moments, rerun it to completion, and get exactly the bytes of an uninterrupted run (DMD_SOAK=1: 20+ kills)."""
import os
import random

import pytest

from storage import read_manifest, verify_shard
from storage.layout import PAIRS_MANIFEST, run_store
from storage.stream import read_shard
from tests.reliability.conftest import run_to_end
from tests.reliability.harness import (SOAK, env_for, kill_group, outputs, pipeline_command, record_figures, start,
                                       temporaries, wait_for)

pytestmark = pytest.mark.slow
N_PAIRS = 96  # digits-tiny: pairs.n
SHARD, PAIRS_DONE = "pairs/shard-000000.tar", "pairs/_complete.json"
CHECKPOINT_FILE, DISTILL_DONE = "distill/checkpoints/step-00000002/ema.safetensors", "distill/_complete.json"
# Kill points of one run folder, in pipeline order: right after a file appears (a shard, a marker, a checkpoint
# file) or at a seeded random moment, counted in files written (temporaries included), so a kill lands mid-write
# as often as between writes whatever the machine's speed. Each kill is followed by a rerun that resumes.
# A random kill can land past the next file point, which is then skipped: fresh run folders follow the same plan
# until the target number of kills is reached.
PLAN = [SHARD, None, PAIRS_DONE, None, CHECKPOINT_FILE, None, DISTILL_DONE] if SOAK else \
    [SHARD, None, CHECKPOINT_FILE, None, DISTILL_DONE]
TARGET = 20 if SOAK else 5


def count_files(run) -> int:
    return sum(len(fs) for _, _, fs in os.walk(run))


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


def flow_run_states(run):
    """States of the flow runs that worked on `run` (tagged with its folder)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags

    from flows.crashed import run_tag

    tag = run_tag(run_store(str(run.parent), run.name).root_url)
    with get_client(sync_client=True) as client:
        return [r.state.type.value for r in client.read_flow_runs(flow_run_filter=FlowRunFilter(
            tags=FlowRunFilterTags(all_=[tag])))]


def test_kills_at_files_and_random_moments_recover_bit_identically(prefect_api, baseline, tmp_path):
    _, base_run, expected, _ = baseline
    total = count_files(base_run)
    env, rng, log = env_for(prefect_api), random.Random(20261125), tmp_path / "log.txt"
    tried, roots = 0, []
    while tried < TARGET:
        assert len(roots) < 8, f"only {tried} kills in {len(roots)} run folders"
        root = tmp_path / f"chain-{len(roots)}"
        run = root / "crash"
        roots.append(root)
        for key in PLAN:
            if key is not None and (run / key).exists():
                continue  # a random kill went past this point already
            now = count_files(run) if run.exists() else 0
            if key is None and now + 1 >= total - 1:
                continue  # nothing left to interrupt
            threshold = rng.randint(now + 1, total - 1) if key is None else None
            proc = start(pipeline_command(root, "crash"), env, log)
            reached = wait_for(proc, (lambda: (run / key).exists()) if key is not None else
                               (lambda: run.exists() and count_files(run) >= threshold))
            killed = reached and kill_group(proc)
            assert killed or proc.returncode == 0, log.read_text()[-3000:]
            tried += killed
        run_to_end(pipeline_command(root, "crash"), env, log)  # then uninterrupted to the end
        check_complete(run, expected)
    states = [s for root in roots for s in flow_run_states(root / "crash")]
    assert "RUNNING" not in states and states.count("CRASHED") >= tried - 1, states
    record_figures("crash", kills_tried=tried, kills_survived=tried, run_folders=len(roots),
                   flow_runs_marked_crashed=states.count("CRASHED"))

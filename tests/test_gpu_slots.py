"""The `gpu` global concurrency limit on a real Prefect server and process worker: a distill deployment run and an
evaluate deployment run started together take turns on a limit of 1 and overlap on a limit of 2. When each run held
its slot is read from the server's `prefect.concurrency-limit.acquired/released` events."""
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request

import pytest

from tests.test_e2e_prefect import REPO, prefect, prefect_env, stop  # noqa: F401 (prefect_env: the real server)

pytestmark = pytest.mark.slow
# device=auto may use a GPU, so its stages hold slots (on this CPU-only host too). Distill holds its slot for
# seconds (640 steps), longer than the worker takes to start the evaluation.
OVERRIDES = ["device=auto", "distill.steps=640", "distill.checkpoint_every=320", "distill.sample_every=640"]


def slot_events(env: dict, since: dt.datetime) -> list[tuple[str, str, dt.datetime]]:
    """(task name, "acquired" or "released", when) of the `gpu` slot events since `since`, oldest first."""
    body = {"filter": {"occurred": {"since": since.isoformat()},
                       "event": {"prefix": ["prefect.concurrency-limit."]}, "order": "ASC"}, "limit": 50}
    request = urllib.request.Request(f"{env['PREFECT_API_URL']}/events/filter", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(request, timeout=30) as r:
        events = json.load(r)["events"]
    assert len(events) < 50, "more slot events than one page"
    out = []
    for e in events:
        if e["resource"].get("prefect.resource.name") != "gpu":
            continue
        task = [r["prefect.resource.name"] for r in e["related"] if r["prefect.resource.role"] == "task-run"]
        out.append((task[0].rsplit("-", 1)[0] if task else "?", e["event"].rsplit(".", 1)[1],
                    dt.datetime.fromisoformat(e["occurred"])))
    return out


def slot_intervals(env: dict, since: dt.datetime) -> dict[str, tuple[dt.datetime, dt.datetime]]:
    """Task name ("distill", "evaluate", ...) -> (acquired, released) of the `gpu` slots held since `since`."""
    held: dict[str, list] = {}
    for name, phase, when in slot_events(env, since):
        held.setdefault(name, []).append((phase, when))
    return {name: (min(t for p, t in ts if p == "acquired"), max(t for p, t in ts if p == "released"))
            for name, ts in held.items() if {p for p, _ in ts} == {"acquired", "released"}}


def deployment_run(env: dict, name: str, params: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "prefect", "deployment", "run", f"dmd/{name}", "--params",
                             json.dumps(params), "--watch", "--watch-timeout", "400"], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def distill_and_evaluate_together(env: dict, root: str) -> dict[str, tuple[dt.datetime, dt.datetime]]:
    """Run both deployments at once: distill first, evaluate as soon as distill holds its slot (flow runs start
    seconds apart in a process worker, and a short evaluation could otherwise be over before distill asks);
    wait for both; their slot intervals."""
    since = dt.datetime.now(dt.timezone.utc)
    params = {"preset": "digits-tiny", "overrides": OVERRIDES, "root": root, "run_name": "r"}
    runs = [deployment_run(env, "distill", {**params, "force": True})]
    deadline = time.time() + 300
    while not any(e[:2] == ("distill", "acquired") for e in slot_events(env, since)) and time.time() < deadline:
        time.sleep(0.5)
    runs.append(deployment_run(env, "evaluate", params))
    for run in runs:
        out = run.communicate(timeout=450)[0]
        assert run.returncode == 0 and "Completed" in out, out[-3000:]
    deadline = time.time() + 60  # the server persists events in batches
    while set(intervals := slot_intervals(env, since)) != {"distill", "evaluate"} and time.time() < deadline:
        time.sleep(2)
    print({name: (str(a), str(b)) for name, (a, b) in intervals.items()})
    assert set(intervals) == {"distill", "evaluate"}, intervals  # each held the limit's slot, nothing else did
    return intervals


def overlap(a: tuple[dt.datetime, dt.datetime], b: tuple[dt.datetime, dt.datetime]) -> float:
    return (min(a[1], b[1]) - max(a[0], b[0])).total_seconds()


def test_one_gpu_slot_serialises_distill_and_evaluate_two_let_them_overlap(prefect_env, tmp_path):
    env, root = prefect_env, str(tmp_path / "artifacts")
    prefect(env, "work-pool", "create", "dmd", "--type", "process")
    deployed = subprocess.run([sys.executable, "-m", "flows.cli", "deploy", "--gpu-limit", "1"], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=300)
    assert deployed.returncode == 0, deployed.stdout[-3000:] + deployed.stderr[-3000:]
    prepared = subprocess.run([sys.executable, "-m", "flows.cli", "run", "--preset", "digits-tiny", "--root", root,
                               "--run-name", "r", "--stages", "teacher,pairs,distill",
                               *[a for o in OVERRIDES for a in ("--set", o)]],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert prepared.returncode == 0, prepared.stderr[-3000:]

    worker_log = open(tmp_path / "worker.log", "w")
    worker = subprocess.Popen([sys.executable, "-m", "prefect", "worker", "start", "--pool", "dmd"], cwd=tmp_path,
                              env=env, stdout=worker_log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        one = distill_and_evaluate_together(env, root)
        assert overlap(one["distill"], one["evaluate"]) <= 0, one  # one after the other

        resized = subprocess.run([sys.executable, "-m", "flows.cli", "deploy", "--gpu-limit", "2"], cwd=REPO,
                                 env=env, capture_output=True, text=True, timeout=300)
        assert resized.returncode == 0, resized.stderr[-3000:]
        assert "2" in prefect(env, "gcl", "inspect", "gpu")
        shutil.rmtree(os.path.join(root, "r", "eval"))  # else evaluate finds its rows (and marker) and returns at once
        two = distill_and_evaluate_together(env, root)
        assert overlap(two["distill"], two["evaluate"]) > 0, two  # both held a slot at the same time
    finally:
        stop(worker)
        worker_log.close()


def test_a_cpu_run_holds_no_gpu_slot(monkeypatch):
    """device=cpu: the stages never ask for the limit (no Prefect call at all)."""
    from tasks.config import load_config
    from tasks import gpu_slots

    asked = []
    monkeypatch.setattr("prefect.concurrency.sync.concurrency", lambda *a, **k: asked.append(a))
    with gpu_slots.gpu_slots(load_config("digits-tiny")):
        pass
    assert asked == []

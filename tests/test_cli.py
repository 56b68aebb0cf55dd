"""The `dmd` command line as a user runs it (real subprocesses of the installed console script)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
DMD = [sys.executable, "-m", "flows.cli"]


def dmd(*args, cwd=None):
    return subprocess.run([*DMD, *args], cwd=cwd or REPO, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "200"}, timeout=300)


def test_help_lists_commands_stages_and_options():
    out = dmd("--help")
    assert out.returncode == 0
    for command in ("run", "deploy", "sample", "presets"):
        assert command in out.stdout
    run = dmd("run", "--help")
    assert run.returncode == 0
    for option in ("--preset", "--config", "--root", "--stages", "--set", "--dry-run", "--force"):
        assert option in run.stdout
    assert "teacher,pairs,real,distill,export,evaluate" in run.stdout.replace("\n", "").replace(" ", "")


def test_dry_run_prints_the_resolved_default_config():
    out = dmd("run", "--dry-run")
    assert out.returncode == 0, out.stderr
    resolved = yaml.safe_load(out.stdout)
    assert resolved["name"] == "digits" and resolved["distill"]["lr"] > 0
    assert set(resolved) >= {"data", "teacher", "pairs", "distill", "export", "evaluate"}
    override = yaml.safe_load(dmd("run", "--dry-run", "--set", "distill.lr=3e-6").stdout)
    assert override["distill"]["lr"] == 3e-6


def test_bad_config_value_is_one_line_naming_the_field_and_writes_nothing(tmp_path):
    root = tmp_path / "artifacts"
    out = dmd("run", "--root", str(root), "--set", "distill.lr=-1")
    assert out.returncode != 0
    assert out.stderr.strip().count("\n") == 0 and "distill.lr" in out.stderr
    assert not root.exists()
    for args, field in ((["--set", "pairs.solver=euler2"], "pairs.solver"),
                        (["--preset", "nope"], "preset"),
                        (["--stages", "pairs,bogus"], "--stages"),
                        (["--set", "distill.generator_timesteps=[5,9]"], "distill.generator_timesteps")):
        out = dmd("run", "--root", str(root), *args)
        assert out.returncode != 0 and field in out.stderr and out.stderr.strip().count("\n") == 0, out.stderr
    assert not root.exists()


def test_config_file_and_sample_command(tiny_run, tmp_path):
    from storage.layout import EXPORT, run_store
    from storage.models import local_folder

    cfg = tmp_path / "c.yaml"
    cfg.write_text("name: mine\ndistill: {steps: 7}\n")
    resolved = yaml.safe_load(dmd("run", "--config", str(cfg), "--dry-run").stdout)
    assert resolved["name"] == "mine" and resolved["distill"]["steps"] == 7
    root, run, _ = tiny_run
    with local_folder(run_store(root, run), EXPORT) as path:
        out = dmd("sample", "--export", path, "--n", "12", "-o", str(tmp_path / "g.png"))
    assert out.returncode == 0, out.stderr
    from PIL import Image

    img = Image.open(tmp_path / "g.png")
    assert img.size == ((8 * 9 + 1) * 4, (2 * 9 + 1) * 4)


def _env_without_prefect_api(**extra) -> dict:
    """The environment of a user who set neither PREFECT_API_URL nor a server start-up timeout."""
    drop = ("PREFECT_API_URL", "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    return {**env, "PYTHONPATH": str(REPO), "COLUMNS": "200", **extra}


def test_a_temporary_server_that_does_not_answer_is_one_line_exit_2(tmp_path):
    """A real temporary server given 1 s to answer (it needs several): two tries, then one line saying what to do;
    nothing written."""
    root = tmp_path / "artifacts"
    out = subprocess.run([*DMD, "run", "--preset", "digits-tiny", "--root", str(root)], cwd=REPO, capture_output=True,
                         text=True, timeout=300,
                         env=_env_without_prefect_api(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="1"))
    err = out.stderr.strip().splitlines()
    assert out.returncode == 2, out.stderr[-2000:]
    assert err[-1].startswith("error: the temporary Prefect server did not answer within 1 s (2 tries")
    assert "prefect server start" in err[-1] and "PREFECT_API_URL" in err[-1]
    assert not root.exists()


def test_startup_timeout_default_and_override(monkeypatch):
    from flows.server import DEFAULT_TIMEOUT_S, TIMEOUT_ENV, ServerStartError, startup_timeout

    monkeypatch.delenv(TIMEOUT_ENV, raising=False)
    assert startup_timeout() == DEFAULT_TIMEOUT_S >= 120
    monkeypatch.setenv(TIMEOUT_ENV, "45")
    assert startup_timeout() == 45
    for bad in ("soon", "0.5", "0"):
        monkeypatch.setenv(TIMEOUT_ENV, bad)
        with pytest.raises(ServerStartError, match=TIMEOUT_ENV):
            startup_timeout()


@pytest.mark.slow
def test_bare_dmd_run_on_a_busy_two_core_machine(tmp_path):
    """The README's bare `dmd run` (no PREFECT_API_URL, no timeout variable) with two CPU-bound processes beside it."""
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    try:
        out = subprocess.run([*DMD, "run", "--preset", "digits-tiny", "--root", str(tmp_path / "artifacts")],
                             cwd=tmp_path, capture_output=True, text=True, timeout=1500,
                             env=_env_without_prefect_api(OMP_NUM_THREADS="1"))
    finally:
        for p in busy:
            p.kill()
            p.wait()
    assert out.returncode == 0, out.stderr[-3000:]
    assert "stages teacher,pairs,distill,export,evaluate complete" in out.stdout


SIGTERM_SCRIPT = """
import atexit, signal, subprocess, sys, time
from flows.server import exit_on_sigterm
if sys.argv[1] == "own-handler":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(7))
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
atexit.register(child.terminate)  # as Prefect registers its temporary server's stop
exit_on_sigterm()
print(child.pid, flush=True)
time.sleep(120)
"""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            return "\nState:\tZ" not in f.read()
    except FileNotFoundError:
        return False


@pytest.mark.parametrize("mode, code", [("default", 128 + 15), ("own-handler", 7)])
def test_sigterm_runs_exit_handlers_so_the_temporary_server_stops(mode, code):
    import signal
    import time

    proc = subprocess.Popen([sys.executable, "-c", SIGTERM_SCRIPT, mode], cwd=REPO, stdout=subprocess.PIPE, text=True)
    child = int(proc.stdout.readline())
    assert _alive(child)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == code  # a handler the process set itself is left in place
    deadline = time.time() + 30
    while _alive(child) and time.time() < deadline:
        time.sleep(0.1)
    assert not _alive(child), "the child the exit handler stops outlived its parent"

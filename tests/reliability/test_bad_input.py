"""Bad input, table-driven: every case exits 2 with one line naming the field or file, and writes nothing
(a snapshot of the workspace, an existing run and an export included, is the same before and after)."""
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time

import pytest
from typer.testing import CliRunner

from flows.cli import app
import flows.pipeline  # noqa: F401  Prefect sets up its log handlers on import: on the real stderr, not the runner's
from tests.reliability.harness import REPO, record_figures

pytestmark = pytest.mark.slow
NO_AWS = {"AWS_ACCESS_KEY_ID": None, "AWS_SECRET_ACCESS_KEY": None, "AWS_SESSION_TOKEN": None, "AWS_PROFILE": None,
          "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/credentials", "AWS_CONFIG_FILE": "/nonexistent/config",
          "AWS_EC2_METADATA_DISABLED": "true", "AWS_CONTAINER_CREDENTIALS_FULL_URI": None,
          "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI": None, "AWS_WEB_IDENTITY_TOKEN_FILE": None}

RUN = ["run", "--root", "{root}"]
TINY = [*RUN, "--preset", "digits-tiny"]
PIXEL = [*RUN, "--preset", "pixel-tiny"]
SAMPLE = ["sample", "--export", "{export}", "--n", "2"]
CONFIG_VALUES = [  # (override, field named): values the config model rejects
    ("distill.lr=-1", "distill.lr"), ("distill.lr=abc", "distill.lr"), ("pairs.solver=euler2", "pairs.solver"),
    ("distill.generator_timesteps=[5,9]", "distill.generator_timesteps"), ("distill.steps=0", "distill.steps"),
    ("distill.batch_size=0", "distill.batch_size"), ("pairs.n=0", "pairs.n"),
    ("pairs.shard_size=-3", "pairs.shard_size"),
    ("pairs.steps=0", "pairs.steps"), ("pairs.dtype=int8", "pairs.dtype"), ("data.image_size=0", "data.image_size"),
    ("data.channels=0", "data.channels"), ("data.num_classes=-1", "data.num_classes"), ("device=tpu", "device"),
    ("distill.regression=l3", "distill.regression"), ("teacher.kind=vae", "teacher.kind"),
    ("teacher.source=path", "teacher.path"), ("distill.ema_decay=1.5", "distill.ema_decay"),
    ("distill.checkpoint_every=0", "distill.checkpoint_every"), ("evaluate.protocol=imagenet", "evaluate.protocol"),
    ("distill.max_consecutive_nonfinite=0", "distill.max_consecutive_nonfinite"),
    ("distill.dm_t_min=2", "distill.dm_t_min"), ("teacher.beta_end=1.5", "teacher.beta_end"),
    ("distill.gan.enabled=maybe", "distill.gan.enabled"), ("distill.fake_updates_per_generator=0",
                                                            "distill.fake_updates_per_generator"),
    ("export.check_atol=0", "export.check_atol"), ("distill.nosuchfield=1", "nosuchfield"),
    ("distill.lpips_net=resnet", "distill.lpips_net"), ("pairs.guidance=-1", "pairs.guidance"),
]


def cases():
    """(name, argv, text the one line must contain); {root}, {export}, {ws} are filled in per workspace."""
    table = [
        ("empty root", ["run", "--root", ""], "--root"),
        ("unknown scheme", ["run", "--root", "foo://x"], "unknown scheme"),
        ("root is a file", ["run", "--root", "{ws}/plain-file"], "is a file"),
        ("root under a file", ["run", "--root", "{ws}/plain-file/sub"], "is a file"),
        ("root not writable", ["run", "--root", "/proc/dmd-x"], "cannot write"),
        ("s3 root without credentials", ["run", "--root", "s3://dmd-no-such-bucket/x"], "no AWS credentials"),
        ("stage-only rerun of a missing run", [*RUN, "--stages", "evaluate"], "run 'digits' does not exist"),
        ("export without --preset on a digits-tiny root", [*RUN, "--stages", "export"], "runs there: crash"),
        ("missing run of a preset", [*TINY, "--stages", "distill,export"], "run 'digits-tiny' does not exist"),
        ("teacher path missing", [*RUN, "--set", "teacher.source=path", "--set", "teacher.path=/nonexistent"],
         "/nonexistent"),
        ("teacher path is a file", [*RUN, "--set", "teacher.source=path", "--set", "teacher.path={ws}/plain-file"],
         "teacher.path"),
        ("teacher folder without unet", [*PIXEL, "--set", "teacher.path={ws}/empty-dir"], "teacher.path"),
        ("teacher unet config not JSON", [*PIXEL, "--set", "teacher.path={ws}/bad-teacher"], "config.json"),
        ("image size unlike the teacher's", [*PIXEL, "--set", "data.image_size=16"], "data.image_size"),
        ("channels unlike the teacher's", [*PIXEL, "--set", "data.channels=1"], "data.channels"),
        ("captions missing", [*RUN, "--preset", "sd-tiny", "--set", "data.captions=/nowhere/prompts.txt"],
         "data.captions"),
        ("bad run name", [*RUN, "--run-name", "bad/name"], "--run-name"),
        ("run name with a space", [*RUN, "--run-name", "a b"], "--run-name"),
        ("cuda without a GPU", [*RUN, "--set", "device=cuda"], "device"),
        ("distill below the latest checkpoint", [*TINY, "--run-name", "crash", "--stages", "distill", "--set",
                                                 "distill.steps=2"], "distill.steps=2"),
        ("unknown stage", [*RUN, "--stages", "pairs,bogus"], "--stages"),
        ("unknown preset", [*RUN, "--preset", "nope"], "preset"),
        ("preset and config both", [*TINY, "--config", "{ws}/good.yaml"], "either a preset or a config"),
        ("config file missing", [*RUN, "--config", "{ws}/missing.yaml"], "missing.yaml"),
        ("config not YAML", [*RUN, "--config", "{ws}/bad.yaml"], "bad.yaml"),
        ("config not a mapping", [*RUN, "--config", "{ws}/list.yaml"], "list.yaml"),
        ("override without =", [*RUN, "--set", "distill.lr"], "distill.lr"),
        ("sample: export missing", ["sample", "--export", "{ws}/no-export"], "--export"),
        ("sample: not an export", ["sample", "--export", "{ws}/empty-dir"], "model_index.json"),
        ("sample: cuda without a GPU", [*SAMPLE, "--device", "cuda", "-o", "{ws}/g.png"], "--device"),
        ("sample: unknown device", [*SAMPLE, "--device", "tpu", "-o", "{ws}/g.png"], "--device"),
        ("sample: output not writable", [*SAMPLE, "-o", "/proc/x.png"], "-o"),
        ("sample: output folder missing", [*SAMPLE, "-o", "{ws}/nowhere/g.png"], "does not exist"),
        ("sample: output is a folder", [*SAMPLE, "-o", "{ws}/empty-dir"], "is a folder"),
        ("sample: truncated weights", ["sample", "--export", "{ws}/truncated", "-o", "{ws}/g.png"], "cannot load"),
        ("sample: model_index not JSON", ["sample", "--export", "{ws}/bad-index", "-o", "{ws}/g.png"], "model_index"),
        ("make-teacher: unknown kind", ["make-teacher", "--tiny", "vae", "--out", "{ws}/t"], "--tiny"),
        ("make-teacher: out not empty", ["make-teacher", "--tiny", "pixel", "--out", "{root}"], "--out"),
        ("report: missing run", ["report", "nope", "--root", "{root}"], "nope"),
        ("train-teacher: bad value", ["train-teacher", "--out", "{ws}/t", "--set", "teacher.lr=0"], "teacher.lr"),
    ]
    table += [(f"config value {o}", [*RUN, "--set", o], field) for o, field in CONFIG_VALUES]
    return table


def snapshot(folder):
    """Every file under `folder` with its bytes' hash and mtime, and every folder."""
    out = {}
    for d, dirs, fs in os.walk(folder):
        for name in dirs:
            out[os.path.relpath(os.path.join(d, name), folder)] = "dir"
        for name in fs:
            p = os.path.join(d, name)
            out[os.path.relpath(p, folder)] = (hashlib.sha256(open(p, "rb").read()).hexdigest(), os.stat(p).st_mtime_ns)
    return out


@pytest.fixture
def workspace(tmp_path, baseline, monkeypatch):
    """A root holding a copy of the finished tiny run, its export, broken teacher/export folders, config files."""
    _, run, _, _ = baseline
    ws = tmp_path / "ws"
    shutil.copytree(run, ws / "artifacts" / "crash")
    shutil.copytree(run / "export", ws / "export")
    shutil.copytree(run / "export", ws / "truncated")
    weights = next((ws / "truncated").rglob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:100])
    shutil.copytree(run / "export", ws / "bad-index")
    (ws / "bad-index" / "model_index.json").write_text("{not json")
    (ws / "empty-dir").mkdir()
    (ws / "bad-teacher" / "unet").mkdir(parents=True)
    (ws / "bad-teacher" / "unet" / "config.json").write_text("{oops")
    (ws / "bad-teacher" / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    (ws / "bad-teacher" / "scheduler").mkdir()
    (ws / "bad-teacher" / "scheduler" / "scheduler_config.json").write_text("{}")
    (ws / "plain-file").write_text("x")
    (ws / "good.yaml").write_text("name: mine\n")
    (ws / "bad.yaml").write_text("name: [unclosed\n")
    (ws / "list.yaml").write_text("- a\n- b\n")
    monkeypatch.chdir(ws)
    return ws


def test_bad_inputs_are_one_line_exit_2_and_write_nothing(workspace):
    ws = workspace
    runner, failures, table = CliRunner(), [], cases()
    for name, argv, needle in table:
        argv = [a.replace("{root}", str(ws / "artifacts")).replace("{export}", str(ws / "export"))
                .replace("{ws}", str(ws)) for a in argv]
        before = snapshot(ws)
        out = runner.invoke(app, argv, env=NO_AWS)
        err = out.stderr.strip()
        clean = (out.exit_code == 2 and err.startswith("error: ") and "\n" not in err and needle in err
                 and snapshot(ws) == before)
        if not clean:
            failures.append(f"{name}: exit {out.exit_code}: {err[-300:]!r} {out.stdout[-200:]!r}")
    record_figures("bad_input", tried=len(table), rejected_cleanly=len(table) - len(failures))
    assert len(table) >= 50
    assert not failures, "\n".join(failures)


def test_debug_shows_the_traceback_of_an_expected_error(workspace):
    for argv in (["run", "--root", "foo://x"], ["sample", "--export", str(workspace / "truncated"),
                                                "-o", str(workspace / "g.png")]):
        plain, debug = CliRunner().invoke(app, argv), CliRunner().invoke(app, ["--debug", *argv])
        assert plain.exit_code == debug.exit_code == 2 and "Traceback" not in plain.stderr
        assert "Traceback" in debug.stderr and debug.stderr.strip().splitlines()[-1] == plain.stderr.strip()


def test_a_flow_run_without_parameters_does_not_invent_a_run(workspace):
    """`prefect deployment run dmd/evaluate` with no parameters: the flow refuses before writing anything."""
    from flows.pipeline import dmd
    from flows.preflight import PreflightError

    before = snapshot(workspace)
    with pytest.raises(PreflightError, match="run 'digits' does not exist"):
        dmd.fn(stages=["evaluate"])
    assert snapshot(workspace) == before


def test_deploy_to_a_missing_pool_is_refused(prefect_api, workspace):
    out = CliRunner().invoke(app, ["deploy", "--pool", "other"], env={"PREFECT_API_URL": prefect_api})
    assert out.exit_code == 2 and "work pool 'other' not found" in out.stderr and "\n" not in out.stderr.strip()


def test_deploy_honours_the_pool(tmp_path):
    import yaml

    from flows.cli import pool_prefect_file

    spec = yaml.safe_load(pool_prefect_file("other", tmp_path).read_text())
    assert {d["work_pool"]["name"] for d in spec["deployments"]} == {"other"} and len(spec["deployments"]) >= 7


# Runs the command line in a fresh interpreter and prints, after it exits, which heavy packages it imported.
PROBE = """
import atexit, json, sys
atexit.register(lambda: print(json.dumps(sorted(m for m in ("torch", "diffusers", "prefect", "webdataset",
                                                          "matplotlib") if m in sys.modules))))
from flows.cli import main
sys.argv = ["dmd", *sys.argv[1:]]
main()
"""
FAST_REJECTIONS = [  # (name, argv, text the line must contain): roots, runs and run names, the 15 s cases
    ("root is a file", ["run", "--root", "{ws}/plain-file"], "is a file"),
    ("root under a file", ["run", "--root", "{ws}/plain-file/sub"], "is a file"),
    ("unknown scheme", ["run", "--root", "foo://x"], "unknown scheme"),
    ("bad run name", ["run", "--root", "{root}", "--run-name", "bad/name"], "--run-name"),
    ("missing run", ["run", "--root", "{root}", "--preset", "digits-tiny", "--stages", "distill"],
     "does not exist"),
    ("teacher path missing", ["run", "--root", "{root}", "--set", "teacher.source=path", "--set",
                              "teacher.path=/nonexistent"], "/nonexistent"),
    ("report: missing run", ["report", "nope", "--root", "{root}"], "nope"),
    ("sample: export missing", ["sample", "--export", "{ws}/no-export"], "--export"),
]


def test_rejections_import_no_heavy_package(workspace):
    """Roots, runs and run names are checked before torch, diffusers, Prefect or WebDataset load: that is what
    makes a rejection take about a second instead of 10-15 s (wall times go to the figures file, not asserted)."""
    seconds, bad = {}, []
    for name, argv, needle in FAST_REJECTIONS:
        argv = [a.replace("{root}", str(workspace / "artifacts")).replace("{ws}", str(workspace)) for a in argv]
        t0 = time.perf_counter()
        out = subprocess.run([sys.executable, "-c", PROBE, *argv], cwd=REPO, capture_output=True, text=True,
                             env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)
        seconds[name] = round(time.perf_counter() - t0, 2)
        heavy = json.loads(out.stdout.strip().splitlines()[-1])
        err = out.stderr.strip()
        if out.returncode != 2 or "\n" in err or needle not in err or heavy:
            bad.append(f"{name}: exit {out.returncode}, imported {heavy}: {err[-300:]!r}")
    record_figures("bad_input_latency", seconds=seconds, max_seconds=max(seconds.values()))
    assert not bad, "\n".join(bad)

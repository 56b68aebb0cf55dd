"""Bad input is caught before a server starts or a byte is written: one line naming the field or file, exit 2."""
import os

import pytest
from typer.testing import CliRunner

from flows.cli import app
import flows.pipeline  # noqa: F401  Prefect sets up its log handlers on import: on the real stderr, not the runner's


def snapshot(folder):
    return sorted(os.path.join(d, f) for d, _, fs in os.walk(folder) for f in fs) if os.path.exists(folder) else None


def cases(tmp_path):
    a_file = tmp_path / "plain-file"
    a_file.write_text("x")
    return [
        (["--root", ""], "--root"),
        (["--root", "foo://x"], "unknown scheme"),
        (["--root", str(a_file)], "is a file"),
        (["--root", str(a_file / "sub")], "is a file"),
        (["--root", "/proc/dmd-x"], "cannot write"),
        (["--root", "{root}", "--stages", "evaluate"], "run 'digits' does not exist"),
        (["--root", "{root}", "--stages", "export", "--preset", "digits-tiny"], "run 'digits-tiny' does not exist"),
        (["--root", "{root}", "--set", "teacher.source=path", "--set", "teacher.path=/nonexistent"],
         "/nonexistent"),
        (["--root", "{root}", "--preset", "sd-tiny", "--set", "data.captions=/nowhere/prompts.txt"], "data.captions"),
        (["--root", "{root}", "--run-name", "bad/name"], "--run-name"),
    ]


def test_bad_input_is_one_line_and_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root = tmp_path / "artifacts"
    root.mkdir()
    table = cases(tmp_path)
    before = snapshot(tmp_path)
    runner = CliRunner()
    for args, needle in table:
        args = [a.replace("{root}", str(root)) for a in args]
        out = runner.invoke(app, ["run", *args])
        err = out.stderr.strip() if out.stderr_bytes is not None else out.output.strip()
        assert out.exit_code == 2, (args, out.output)
        assert needle in err and "\n" not in err, (args, err)
        assert snapshot(tmp_path) == before, args


def test_cuda_without_a_gpu_is_refused(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    out = CliRunner().invoke(app, ["run", "--root", str(tmp_path / "a"), "--set", "device=cuda"])
    assert out.exit_code == 2 and "device" in out.output and not (tmp_path / "a").exists()

"""Run report: trend/loss PNGs written into the run's store, labelled comparison grids, `dmd report`."""
from __future__ import annotations

import base64
import io
import os
import tempfile

# matplotlib caches its font list under MPLCONFIGDIR (default ~/.cache): keep test runs in /tmp.
os.environ.setdefault("MPLCONFIGDIR", tempfile.mkdtemp(prefix="dmd-mpl-"))

import math  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from flows.cli import app  # noqa: E402
from tasks.report import LOSS, TREND, latest_table, markdown_with_images, report  # noqa: E402
from storage.layout import METRICS, RESULTS, run_store  # noqa: E402
from storage.plots import grid_size, labelled_grid_png, loss_figure, trend_figure  # noqa: E402
from tasks.distill import METRIC_COLUMNS  # noqa: E402
from tasks.evaluate import COLUMNS  # noqa: E402

RUN = "r1"


def result_rows(run: str = RUN) -> list[dict]:
    """Real floor, teacher 50- and 1-step, and a student at three checkpoints, for fd and accuracy."""
    rows = []

    def add(model, steps, step, fd, acc, config_hash="h", time="2026-11-25T10:00:00+00:00"):
        for metric, value in (("fd", fd), ("accuracy", acc)):
            rows.append({"run": run, "config_hash": config_hash, "checkpoint_step": step, "model": model,
                         "steps": steps, "metric": metric, "value": value, "n_samples": 64, "time": time})

    add("real", 0, -1, 0.5, 0.99)
    add("teacher", 50, -1, 2.0, 0.95)
    add("teacher", 1, -1, 40.0, 0.20)
    add("student", 1, 100, 20.0, 0.50, time="2026-11-25T10:01:00+00:00")
    add("student", 1, 200, 8.0, 0.80, time="2026-11-25T10:02:00+00:00")
    add("student", 1, 300, 3.0, 0.90, time="2026-11-25T10:03:00+00:00")
    add("student", 1, 900, 99.0, 0.01, config_hash="old", time="2026-11-24T09:00:00+00:00")  # superseded config
    return rows


def metric_rows(n: int = 30) -> list[dict]:
    rows = []
    for i in range(n):
        step = 10 * (i + 1)
        r = {c: float("nan") for c in METRIC_COLUMNS}
        r.update(step=step, seconds=0.1 * step, loss_G=2.0 / (1 + i), loss_dm=1.5 / (1 + i), loss_reg=0.5 / (1 + i),
                 loss_fake=0.3 + 0.01 * i, grad_norm_G=1.0, grad_norm_fake=1.0, nonfinite_skipped=float(i == n - 1))
        rows.append(r)
    rows[3]["loss_G"] = float("inf")  # a non-finite point is left out of the curve
    return rows


def write_run(root: str, results: bool = True, metrics: bool = True) -> None:
    store = run_store(root, RUN)
    store.write_json("config.json", {"name": RUN})
    if results:
        rows = result_rows()
        store.write_table(RESULTS, {c: [r.get(c) for r in rows] for c in COLUMNS})
    if metrics:
        rows = metric_rows()
        store.write_table(METRICS, {c: [r[c] for r in rows] for c in ["step", "seconds", *METRIC_COLUMNS]})


@pytest.fixture
def root(tmp_path):
    url = f"file://{tmp_path}/artifacts"
    write_run(url)
    return url


def open_png(data: bytes) -> Image.Image:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    img = Image.open(io.BytesIO(data))
    img.load()
    return img


def test_report_writes_deterministic_pngs_and_the_latest_table(root):
    out = report(root, RUN)
    store = run_store(root, RUN)
    assert out["images"] == {"trend": store.url(TREND), "loss": store.url(LOSS)}
    first = {key: store.read_bytes(key) for key in (TREND, LOSS)}
    for data in first.values():
        img = open_png(data)
        assert 600 <= img.width <= 2000 and 300 <= img.height <= 1500
        assert b"Software" not in data and b"tEXt" not in data
    assert report(root, RUN) == out
    assert {key: store.read_bytes(key) for key in (TREND, LOSS)} == first

    assert out["checkpoint_step"] == 300
    table = out["table"].splitlines()
    assert table[0] == "| model | steps | checkpoint step | n samples | FD | class accuracy |"
    assert [line.split(" | ")[0] for line in table[2:]] == ["| real floor", "| teacher 50-step", "| teacher 1-step",
                                                             "| DMD 1-step"]
    assert table[-1] == "| DMD 1-step | 1 | 300 | 64 | 3.00 | 90.0% |"


def test_trend_has_one_axis_per_metric_and_keeps_only_the_current_config():
    rows = result_rows()
    fig = trend_figure(rows, RUN)
    assert len(fig.axes) == 2
    fd_axis = fig.axes[0]
    student = [line for line in fd_axis.get_lines() if line.get_label() == "DMD 1-step student"]
    assert len(student) == 1 and list(student[0].get_xdata()) == [100, 200, 300]
    labels = [t.get_text() for t in fd_axis.get_legend().get_texts()]
    assert [label.split(" (")[0] for label in labels] == ["real floor", "teacher 50-step", "teacher 1-step",
                                                          "DMD 1-step student"]
    assert fd_axis.get_xlabel() == "training step" and fd_axis.get_ylabel() == "fd"
    clip = [{**r, "metric": "clip"} for r in rows if r["metric"] == "fd"]
    assert len(trend_figure(rows + clip, RUN).axes) == 3
    with pytest.raises(ValueError, match="no results rows"):
        trend_figure(rows, "other")


def test_loss_plot_drops_non_finite_points_and_uses_log_scale_when_positive():
    fig = loss_figure(metric_rows())
    gen, critic = fig.axes
    assert {line.get_label() for line in gen.get_lines()} == {"loss_G", "loss_dm", "loss_reg"}
    loss_g = next(line for line in gen.get_lines() if line.get_label() == "loss_G")
    assert len(loss_g.get_xdata()) == 29 and all(math.isfinite(v) for v in loss_g.get_ydata())
    assert gen.get_yscale() == "log" and critic.get_yscale() == "log"
    rows = metric_rows()
    for r in rows:
        r["loss_gan_G"] = -0.1  # a non-positive series keeps the axis linear
    assert loss_figure(rows).axes[0].get_yscale() == "linear"


def test_labelled_grid_size_follows_the_layout():
    g = torch.Generator().manual_seed(0)
    cols = [(name, torch.rand((5, 1, 8, 8), generator=g) * 2 - 1) for name in ("teacher 50-step", "teacher 1-step",
                                                                              "student")]
    labels = ["class 0", "class 1", "a long prompt " * 10, "3", "4"]
    img = open_png(labelled_grid_png(cols, labels, scale=8))
    assert img.size == grid_size(5, 3, 8, 8, 8, True)
    assert img.mode == "RGB"
    rgb = [(t, torch.rand((2, 3, 40, 40), generator=g) * 2 - 1) for t in ("a", "b")]
    assert open_png(labelled_grid_png(rgb)).size == grid_size(2, 2, 40, 40, 2, False)
    with pytest.raises(ValueError, match="row_labels"):
        labelled_grid_png(cols, ["only one"])
    with pytest.raises(ValueError, match="same"):
        labelled_grid_png([cols[0], ("x", torch.zeros(4, 1, 8, 8))])


def test_markdown_embeds_each_png_as_a_data_url(root):
    out = report(root, RUN)
    store = run_store(root, RUN)
    pngs = {"trend": store.read_bytes(TREND), "loss": store.read_bytes(LOSS)}
    md = markdown_with_images("run r1", out["table"], pngs)
    assert md.startswith("# run r1\n\n| model |") and out["table"].rstrip() in md
    for name, png in pngs.items():
        start = md.index(f"![{name}](data:image/png;base64,") + len(f"![{name}](data:image/png;base64,")
        assert base64.b64decode(md[start:md.index(")", start)]) == png


def test_latest_table_without_a_student():
    rows = [r for r in result_rows() if r["model"] != "student"]
    table, last = latest_table(rows, RUN)
    assert last is None and "DMD" not in table


def test_cli_report_prints_the_table_and_paths(root):
    out = CliRunner().invoke(app, ["report", RUN, "--root", root])
    assert out.exit_code == 0, out.output
    store = run_store(root, RUN)
    assert "| DMD 1-step | 1 | 300 | 64 | 3.00 | 90.0% |" in out.output
    assert f"trend: {store.url(TREND)}" in out.output and f"loss: {store.url(LOSS)}" in out.output


def test_cli_report_missing_results_or_run_is_one_line_exit_2(tmp_path):
    url = f"file://{tmp_path}/artifacts"
    write_run(url, results=False)
    runner = CliRunner()
    for run, why in ((RUN, "no evaluation results yet"), ("nope", "no run 'nope'")):
        out = runner.invoke(app, ["report", run, "--root", url])
        assert out.exit_code == 2
        lines = out.output.strip().splitlines()
        assert len(lines) == 1 and RESULTS in lines[0] and why in lines[0], out.output
    assert not run_store(url, RUN).exists(TREND)

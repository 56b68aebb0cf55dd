"""Report images leaving the process as PNG bytes: metric trends, loss curves, labelled comparison grids.

Figures are drawn on matplotlib's Agg canvas (never pyplot, so no global figure state and no display
backend) under the default style, at a fixed DPI and with no Software/date metadata: the same rows
give the same bytes. The comparison grid is composed pixel-exactly with PIL.
"""
from __future__ import annotations

import io
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Optional

import numpy as np
import torch
from matplotlib import get_data_path, style
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from PIL import Image, ImageDraw, ImageFont

from dmd_core.protocols import METRICS, metric_spec

DPI = 100
PNG_METADATA = {"Software": None}  # matplotlib writes only this tEXt chunk into a PNG; drop it
GENERATOR_LOSSES = ("loss_G", "loss_dm", "loss_reg", "loss_gan_G")
CRITIC_LOSSES = ("loss_fake", "loss_gan_D")

# labelled_grid_png layout, in pixels: see grid_size for the arithmetic.
GRID_PAD = 4  # gap around and between cells
GRID_HEADER = 18  # column-title band above the cells
GRID_MIN_COL = 96  # a column is at least this wide (images centred) so its title fits
GRID_LABEL_W = 120  # row-label band left of the cells when row labels are given
GRID_FONT_SIZE = 11


def baseline_label(model: str, steps: int) -> str:
    """How a baseline row is named in plots and tables: 'real floor', 'teacher 50-step', 'DMD 1-step'."""
    if model == "real":
        return "real floor"
    if model == "teacher":
        return f"teacher {steps}-step"
    if model == "student":
        return f"DMD {steps}-step"
    return f"{model} {steps}-step"


def latest_results(rows: Iterable[Mapping], run: str) -> list[dict]:
    """The run's current results rows: the newest row per (model, steps, metric, checkpoint_step), students
    only from the config hash of the newest student row (a changed config starts a new trend)."""
    newest: dict[tuple, tuple[str, int, dict]] = {}
    for i, r in enumerate(rows):
        if r["run"] != run:
            continue
        k = (r["model"], int(r["steps"]), r["metric"], int(r["checkpoint_step"]))
        if k not in newest or (str(r["time"]), i) >= newest[k][:2]:
            newest[k] = (str(r["time"]), i, dict(r))
    kept = [v[2] for v in sorted(newest.values(), key=lambda v: v[1])]
    students = [(str(r["time"]), i) for i, r in enumerate(kept) if r["model"] == "student"]
    if students:
        current = kept[max(students)[1]]["config_hash"]
        kept = [r for r in kept if r["model"] != "student" or r["config_hash"] == current]
    return kept


def metric_names(rows: Iterable[Mapping]) -> list[str]:
    """Metrics present in `rows`, the registered ones first (in METRICS' order), then the rest sorted."""
    present = {r["metric"] for r in rows}
    return [m for m in METRICS if m in present] + sorted(present - set(METRICS))


def _new_figure(width: float, height: float) -> Figure:
    """A figure on its own Agg canvas (call under style.context("default"))."""
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def figure_png(fig: Figure) -> bytes:
    """PNG bytes of a figure at the fixed DPI, without metadata that would vary between runs."""
    buf = io.BytesIO()
    with style.context("default"):  # savefig.* settings of a user's matplotlibrc do not apply
        fig.savefig(buf, format="png", dpi=DPI, metadata=PNG_METADATA, facecolor="white")
    return buf.getvalue()


def trend_figure(rows: Iterable[Mapping], run: str) -> Figure:
    """One axis per metric: the student against training step, baselines as labelled horizontal lines."""
    current = latest_results(rows, run)
    if not current:
        raise ValueError(f"no results rows for run {run!r}")
    metrics = metric_names(current)
    ncols = min(2, len(metrics))
    nrows = math.ceil(len(metrics) / ncols)
    with style.context("default"):
        fig = _new_figure(5.0 * ncols, 3.4 * nrows + 0.4)
        axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
        for ax in axes[len(metrics):]:
            fig.delaxes(ax)
        for ax, metric in zip(axes, metrics):
            _draw_metric(ax, [r for r in current if r["metric"] == metric], metric)
        steps = sorted({r["checkpoint_step"] for r in current if r["model"] == "student"})
        last = f", latest checkpoint step {steps[-1]}" if steps else ", no student checkpoint evaluated yet"
        fig.suptitle(f"run {run}: DMD student vs baselines{last}")
    return fig


def _draw_metric(ax, rows: list[dict], metric: str) -> None:
    baselines = sorted((r for r in rows if r["model"] != "student"),
                       key=lambda r: (["real", "teacher"].index(r["model"]) if r["model"] in ("real", "teacher") else 2,
                                      -int(r["steps"])))
    styles = iter([("tab:gray", ":"), ("tab:green", "--"), ("tab:orange", "-."), ("tab:purple", "--"),
                   ("tab:brown", "-.")])
    for r in baselines:
        color, dash = next(styles, ("black", ":"))
        label = baseline_label(r["model"], int(r["steps"]))
        ax.axhline(r["value"], color=color, linestyle=dash, linewidth=1.5, label=f"{label} ({r['value']:.4g})")
    for steps in sorted({int(r["steps"]) for r in rows if r["model"] == "student"}):
        pts = sorted((r["checkpoint_step"], r["value"]) for r in rows
                     if r["model"] == "student" and int(r["steps"]) == steps)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", color="tab:blue", linewidth=1.5,
                label=f"{baseline_label('student', steps)} student")
    better = {True: " (lower is better)", False: " (higher is better)"}.get(metric_spec(metric).lower_is_better, "")
    ax.set_title(f"{metric}{better}")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("training step")
    ax.set_ylabel(metric)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="best")


def trend_png(rows: Iterable[Mapping], run: str) -> bytes:
    """PNG of trend_figure: each metric of the run's student against training step, with baselines."""
    return figure_png(trend_figure(rows, run))


def _finite_series(rows: Sequence[Mapping], column: str) -> tuple[np.ndarray, np.ndarray]:
    pts = [(r["step"], r[column]) for r in rows if r.get(column) is not None]
    step = np.array([p[0] for p in pts], dtype=np.float64)
    value = np.array([p[1] for p in pts], dtype=np.float64)
    ok = np.isfinite(value)
    return step[ok], value[ok]


def _log_scale(ax, series: list[np.ndarray]) -> None:
    """Log y when every value is > 0; symlog (linear below the smallest positive value) when some are exactly 0,
    as loss_dm is at step 0 (fake score = teacher); linear otherwise."""
    if not series:
        return
    values = np.concatenate(series)
    if (values > 0).all():
        ax.set_yscale("log")
    elif (values >= 0).all() and (values > 0).any():
        ax.set_yscale("symlog", linthresh=float(values[values > 0].min()))


def loss_figure(metrics_rows: Iterable[Mapping]) -> Figure:
    """Generator losses and fake-score/discriminator losses against step, log y where the values allow (_log_scale)."""
    rows = sorted((dict(r) for r in metrics_rows), key=lambda r: r["step"])
    if not rows:
        raise ValueError("no distill metrics rows to plot")
    with style.context("default"):
        fig = _new_figure(10.0, 3.8)
        panels = (("generator", GENERATOR_LOSSES), ("fake score / discriminator", CRITIC_LOSSES))
        for ax, (name, columns) in zip(fig.subplots(1, 2, squeeze=False).ravel(), panels):
            drawn = []
            for column in columns:
                step, value = _finite_series(rows, column)
                if value.size:
                    ax.plot(step, value, linewidth=1.2, marker="." if value.size <= 50 else None, label=column)
                    drawn.append(value)
            _log_scale(ax, drawn)
            if not drawn:
                ax.text(0.5, 0.5, "no finite values", ha="center", va="center", transform=ax.transAxes)
            else:
                ax.legend(fontsize=8, loc="best")
            ax.set_title(name)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_xlabel("training step")
            ax.set_ylabel("loss")
            ax.grid(True, alpha=0.3)
        skipped = rows[-1].get("nonfinite_skipped")
        note = f", non-finite steps skipped: {int(skipped)}" if skipped and math.isfinite(skipped) else ""
        fig.suptitle(f"distillation losses, steps {rows[0]['step']}-{rows[-1]['step']}{note}")
    return fig


def loss_png(metrics_rows: Iterable[Mapping]) -> bytes:
    """PNG of loss_figure over the rows of distill/metrics.parquet."""
    return figure_png(loss_figure(metrics_rows))


def grid_size(n_rows: int, n_cols: int, h: int, w: int, scale: int, labelled: bool) -> tuple[int, int]:
    """(width, height) in pixels of labelled_grid_png's canvas."""
    col_w = max(w * scale, GRID_MIN_COL)
    label_w = GRID_LABEL_W if labelled else 0
    return (label_w + n_cols * (col_w + GRID_PAD) + GRID_PAD,
            GRID_HEADER + n_rows * (h * scale + GRID_PAD) + GRID_PAD)


def _fit(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> str:
    """`text` cut with '...' to fit `width` pixels."""
    text = " ".join(str(text).split())
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text.rstrip() + "..."


def labelled_grid_png(columns: Sequence[tuple[str, torch.Tensor]], row_labels: Optional[Sequence[str]] = None,
                      scale: Optional[int] = None) -> bytes:
    """Side-by-side panels on the same noise: one titled column per model, row i = sample i of each, each row
    labelled (class id or prompt, truncated). Images (N, C, H, W) in [-1, 1], C 1 or 3; `scale` defaults to
    the smallest integer making a cell at least 64 px. Size: grid_size(N, len(columns), H, W, scale, labels)."""
    if not columns:
        raise ValueError("labelled_grid_png: give at least one (title, images) column")
    shape = tuple(columns[0][1].shape)
    for title, images in columns:
        if images.ndim != 4 or images.shape[1] not in (1, 3) or tuple(images.shape) != shape:
            raise ValueError(f"column {title!r}: images of shape {tuple(images.shape)}; every column needs the "
                             f"same (N, C, H, W) with C 1 or 3 (first column {shape})")
    n, _, h, w = shape
    if row_labels is not None and len(row_labels) != n:
        raise ValueError(f"row_labels: {len(row_labels)} labels for {n} rows")
    scale = scale or max(1, math.ceil(64 / max(h, w)))
    width, height = grid_size(n, len(columns), h, w, scale, row_labels is not None)
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.truetype(f"{get_data_path()}/fonts/ttf/DejaVuSans.ttf", GRID_FONT_SIZE)  # ships with matplotlib
    col_w = max(w * scale, GRID_MIN_COL)
    x0 = (GRID_LABEL_W if row_labels is not None else 0) + GRID_PAD
    for j, (title, images) in enumerate(columns):
        left = x0 + j * (col_w + GRID_PAD)
        draw.text((left + col_w // 2, GRID_HEADER // 2), _fit(draw, title, font, col_w), fill="black", font=font,
                  anchor="mm")
        x = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        x = x.expand(-1, 3, -1, -1).permute(0, 2, 3, 1).numpy()
        x = np.repeat(np.repeat(x, scale, 1), scale, 2)
        for i in range(n):
            top = GRID_HEADER + i * (h * scale + GRID_PAD)
            canvas.paste(Image.fromarray(np.ascontiguousarray(x[i])), (left + (col_w - w * scale) // 2, top))
    if row_labels is not None:
        for i, label in enumerate(row_labels):
            mid = GRID_HEADER + i * (h * scale + GRID_PAD) + (h * scale) // 2
            draw.text((GRID_PAD, mid), _fit(draw, label, font, GRID_LABEL_W - 2 * GRID_PAD), fill="black",
                      font=font, anchor="lm")
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    return buf.getvalue()


GUIDANCE_METRICS = ("fd_teacher", "fd", "accuracy", "fid", "clip")
GUIDANCE_TITLES = {**{m.name: m.header for m in METRICS.values()}, "fd": "FD to the real data",
                   "fd_teacher": "FD to the teacher's N-step samples at the same w"}


def guidance_figure(rows: Iterable[Mapping], title: str = "guidance sweep") -> Figure:
    """Metrics against the guidance scale w, one line per `label`; for text models also FID against CLIP
    (the trade-off curve, each point marked with its w). Rows: label, guidance, metric, value."""
    rows = [dict(r) for r in rows]
    if not rows:
        raise ValueError("no guidance sweep rows to plot")
    metrics = [m for m in GUIDANCE_METRICS if any(r["metric"] == m for r in rows)]
    tradeoff = "fid" in metrics and "clip" in metrics
    labels = list(dict.fromkeys(r["label"] for r in rows))
    panels = len(metrics) + tradeoff
    with style.context("default"):
        fig = _new_figure(4.6 * panels, 3.8)
        axes = fig.subplots(1, panels, squeeze=False).ravel()
        colors = dict(zip(labels, ["tab:green", "tab:blue", "tab:orange", "tab:purple", "tab:brown", "tab:red"] * 4))
        for ax, metric in zip(axes, metrics):
            for label in labels:
                pts = sorted((r["guidance"], r["value"]) for r in rows if r["label"] == label and r["metric"] == metric)
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", color=colors[label], label=label)
            better = {True: " ↓", False: " ↑"}.get(metric_spec(metric.split("_")[0]).lower_is_better, "")
            ax.set_title(GUIDANCE_TITLES[metric] + better, fontsize=10)
            ax.set_xlabel("guidance scale w")
            ax.set_ylabel(metric)
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=8, loc="best")
        if tradeoff:
            ax = axes[-1]
            for label in labels:
                by = {(r["guidance"], r["metric"]): r["value"] for r in rows if r["label"] == label}
                ws = sorted(w for w, m in by if m == "fid" and (w, "clip") in by)
                if ws:
                    ax.plot([by[(w, "clip")] for w in ws], [by[(w, "fid")] for w in ws], marker="o",
                            color=colors[label], label=label)
                    for w in ws:
                        ax.annotate(f"w={w:g}", (by[(w, "clip")], by[(w, "fid")]), fontsize=7,
                                    textcoords="offset points", xytext=(3, 3))
            ax.set_title("FID against CLIP score", fontsize=10)
            ax.set_xlabel("CLIP score")
            ax.set_ylabel("FID")
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=8, loc="best")
        fig.suptitle(title)
    return fig


def guidance_png(rows: Iterable[Mapping], title: str = "guidance sweep") -> bytes:
    """PNG of guidance_figure."""
    return figure_png(guidance_figure(rows, title))

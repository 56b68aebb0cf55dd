"""Report of one run: the latest evaluation rows as markdown, trend and loss plots written into the run's store."""
from __future__ import annotations

import base64
from collections.abc import Iterable, Mapping

from dmd_core.protocols import metric_spec
from storage.layout import EVAL_DIR, METRICS, RESULTS, run_store

TREND = f"{EVAL_DIR}/trend.png"
LOSS = f"{EVAL_DIR}/loss.png"


def latest_table(rows: Iterable[Mapping], run_name: str) -> tuple[str, int | None]:
    """Markdown table (one line per model) of the baselines and the latest student checkpoint; and that step."""
    from storage.plots import baseline_label, latest_results, metric_names  # matplotlib: after the cheap checks

    current = latest_results(rows, run_name)
    steps = [r["checkpoint_step"] for r in current if r["model"] == "student"]
    last = max(steps) if steps else None
    keep = [r for r in current if r["model"] != "student" or r["checkpoint_step"] == last]
    metrics = metric_names(keep)
    by = {(r["model"], int(r["steps"]), r["metric"]): r for r in keep}
    order = sorted({(m, s) for m, s, _ in by},
                   key=lambda k: (["real", "teacher", "student"].index(k[0]) if k[0] in ("real", "teacher", "student")
                                  else 3, -k[1]))
    headers = [metric_spec(m).header for m in metrics]
    lines = ["| model | steps | checkpoint step | n samples | " + " | ".join(headers) + " |",
             "|---|---|---|---|" + "---|" * len(metrics)]
    for m, s in order:
        cells = []
        for metric in metrics:
            r = by.get((m, s, metric))
            cells.append(metric_spec(metric).cell(r["value"]) if r else "")
        any_row = next(r for (mm, ss, _), r in by.items() if (mm, ss) == (m, s))
        ckpt = str(any_row["checkpoint_step"]) if m == "student" else ""
        lines.append(f"| {baseline_label(m, s)} | {s} | {ckpt} | {any_row['n_samples']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n", last


def report(root: str, run_name: str) -> dict:
    """Write eval/trend.png (and eval/loss.png when distill metrics exist) for a run; return the table and URLs.

    Raises FileNotFoundError naming eval/results.parquet's URL when the run has no evaluation results.
    """
    store = run_store(root, run_name)
    if not store.exists(RESULTS):
        what = "no evaluation results yet" if store.ls() else f"no run {run_name!r} under {root}"
        raise FileNotFoundError(f"{store.url(RESULTS)} not found ({what})")
    from storage.plots import latest_results, loss_png, trend_png  # matplotlib and torch: after the cheap checks

    rows = store.read_table(RESULTS).to_pylist()
    if not latest_results(rows, run_name):
        raise ValueError(f"{store.url(RESULTS)} has no rows for run {run_name!r}")
    table, last = latest_table(rows, run_name)
    store.write_bytes(TREND, trend_png(rows, run_name))
    images = {"trend": store.url(TREND)}
    if store.exists(METRICS):
        metrics = store.read_table(METRICS).to_pylist()
        if metrics:
            store.write_bytes(LOSS, loss_png(metrics))
            images["loss"] = store.url(LOSS)
    return {"run": run_name, "checkpoint_step": last, "table": table, "images": images}


def markdown_with_images(title: str, table_md: str, images: Mapping[str, bytes]) -> str:
    """Markdown for a Prefect markdown artifact: title, table, then each PNG embedded as a data: URL."""
    parts = [f"# {title}", "", table_md.rstrip(), ""]
    for name, png in images.items():
        parts += [f"![{name}](data:image/png;base64,{base64.b64encode(png).decode('ascii')})", ""]
    return "\n".join(parts)

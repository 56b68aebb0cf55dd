"""Stage `evaluate`: score the teacher baselines and the student checkpoints at the run's protocol.

Classifier protocols (the embedded digits): Fréchet distance and class accuracy in a small classifier's features. `coco30k`, `coco10k`,
`cifar10-50k`: clean-fid FID against cached reference statistics, plus the CLIP score for text models.
Rows are appended to eval/results.parquet (never duplicating a key); eval/summary.json, eval/compare.png
(teacher N-step | teacher 1-step | student on the same noise), eval/trend.png and eval/loss.png follow.
"""
from __future__ import annotations

from prefect import task
from prefect.cache_policies import NONE

from dmd_core.datasets import DEFAULT_PROTOCOLS, real_dataset
from dmd_core.distributed import current
from dmd_core.protocols import METRICS, Protocol, get_protocol, metric_spec
from tasks.report import LOSS, TREND, markdown_with_images, report
from storage import ArtifactStore
from storage.images import grid_png
from storage.layout import EVAL_COMPARE, EVAL_GRID, RESULTS, SUMMARY
from storage.plots import labelled_grid_png
from tasks.context import device_for, open_run, run_teacher
from tasks.eval_guidance import run_guidance_sweep
from tasks.eval_protocols import (COLUMNS, KEY_COLUMNS, classifier_protocol, fast_path, image_protocol,
                                  result_hashes)
from tasks.gpu_slots import gpu_slots
from tasks.launch import is_rank, launch_evaluate, writer_store
from tasks.stages import artifact_key, resumable_checkpoints


def protocol_of(cfg) -> Protocol | None:
    """The configured protocol, else the dataset's default one (a named dataset with a classifier), else none."""
    name = cfg.evaluate.protocol or DEFAULT_PROTOCOLS.get(cfg.data.name)
    return get_protocol(name) if name else None


def run_evaluate(root: str, run_name: str, all_checkpoints: bool = False) -> dict:
    """Append new rows to eval/results.parquet (never duplicating a key) and write eval/summary.json."""
    full_store, cfg = open_run(root, run_name)
    if cfg.evaluate.world_size > 1 and not is_rank():  # torchrun starts the ranks, each running this function
        launch_evaluate(root, run_name, all_checkpoints, cfg.evaluate.world_size)
        return full_store.read_json(SUMMARY)
    store, protocol, lead = writer_store(full_store), protocol_of(cfg), current().rank == 0
    if protocol is None:  # no metric protocol for this data: say so rather than fail the pipeline
        summary = {"run": run_name, "checkpoint_step": None, "grid": None, "rows": [],
                   "note": f"no evaluation protocol for data.name={cfg.data.name!r}: set evaluate.protocol"}
        store.write_json(SUMMARY, summary)
        return summary
    device, hashes = device_for(cfg), result_hashes(store, cfg)
    existing = store.read_table(RESULTS).to_pylist() if store.exists(RESULTS) else []
    have = {tuple(r.get(c) for c in KEY_COLUMNS) for r in existing}

    def needed(kind: str, step: int, model: str, steps: int, metric: str) -> bool:
        return (run_name, hashes[kind], step, model, steps, metric) not in have

    # the fast path makes the teacher's decoder fast in place: then this stage loads its own copy
    own = not protocol.classifier and fast_path(cfg, device, cfg.evaluate.n_samples or protocol.n)
    teacher = run_teacher(store, cfg, device, own=own)
    steps = [step for step, _ in resumable_checkpoints(store, cfg)]
    steps = steps if all_checkpoints else steps[-1:]
    if protocol.classifier:
        dataset = real_dataset(cfg.data.name)
        if dataset is None:
            raise ValueError(f"evaluate.protocol={protocol.name} needs its dataset, got data.name={cfg.data.name!r}")
        new, pictures = classifier_protocol(root, store, cfg, run_name, teacher, dataset, protocol, steps, needed, device)
    else:
        new, pictures = image_protocol(root, store, cfg, run_name, teacher, protocol, steps, needed, device)
    write_pictures(store, pictures)
    if cfg.evaluate.guidance_sweep and steps:  # eval/guidance.parquet and eval/guidance.png
        run_guidance_sweep(root, store, cfg, run_name, teacher, protocol,
                           real_dataset(cfg.data.name) if protocol.classifier else None, steps[-1], device)
    if not new:
        summary = summarize(store, existing, run_name, hashes)
    else:
        rows = existing + new
        store.write_table(RESULTS, {c: [r.get(c) for r in rows] for c in COLUMNS})
        summary = summarize(store, rows, run_name, hashes)
        store.write_json(SUMMARY, summary)
        if lead:
            report(root, run_name)  # eval/trend.png and eval/loss.png, redrawn only when rows were added
    if summary["checkpoint_step"] is not None and lead:  # the model card carries the metrics of the checkpoint it exports
        from tasks.export import add_evaluation

        # the card carries the metrics, not where they came from: a rerun that reads cached rows leaves it alone
        add_evaluation(store, summary_markdown({**summary, "grid": None}, show_cached=False), summary["checkpoint_step"])
    return summary


def write_pictures(store: ArtifactStore, pictures: dict) -> None:
    """eval/grid.png (the latest student) and eval/compare.png (the models side by side, labelled)."""
    if pictures["grid"] is not None:
        store.write_bytes(EVAL_GRID, grid_png(pictures["grid"]))
    columns = list(pictures["pictures"].items())
    if len(columns) >= 2 and len({c.shape for _, c in columns}) == 1:
        labels = pictures["labels"][: columns[0][1].shape[0]] if pictures["labels"] else None
        store.write_bytes(EVAL_COMPARE, labelled_grid_png(columns, labels))


def summarize(store: ArtifactStore, rows: list[dict], run_name: str, hashes: dict[str, str]) -> dict:
    """The current config's rows: baselines and the latest evaluated student checkpoint."""
    current = [r for r in rows if r["run"] == run_name and r.get("config_hash") in hashes.values()]
    student_steps = [r["checkpoint_step"] for r in current if r["model"] == "student"]
    last = max(student_steps) if student_steps else None
    keep = [r for r in current if r["model"] != "student" or r["checkpoint_step"] == last]
    return {"run": run_name, "checkpoint_step": last, "grid": store.url(EVAL_GRID) if last is not None else None,
            "compare": store.url(EVAL_COMPARE) if store.exists(EVAL_COMPARE) else None,
            "rows": [{**{k: r[k] for k in ("model", "steps", "metric", "value", "n_samples", "checkpoint_step")},
                      "precision": r.get("precision"), "cached": bool(r.get("cached"))} for r in keep]}


@task(name="evaluate", cache_policy=NONE, persist_result=False)
def evaluate_task(root: str, run_name: str, all_checkpoints: bool = False) -> dict:
    """Prefect wrapper of run_evaluate; publishes the table, and the pictures embedded in a markdown artifact."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    store, cfg = open_run(root, run_name)
    with gpu_slots(cfg, occupy=cfg.evaluate.world_size):  # data-parallel ranks: one slot (GPU) each
        summary = run_evaluate(root, run_name, all_checkpoints)
    create_table_artifact(artifact_rows(summary["rows"]), key=artifact_key(run_name, "eval"),
                          description=f"DMD evaluation of {run_name}")
    images = {name: store.read_bytes(key) for name, key in (("compare", EVAL_COMPARE), ("trend", TREND),
                                                            ("loss", LOSS)) if store.exists(key)}
    create_markdown_artifact(markdown_with_images(f"DMD evaluation of {run_name}", summary_markdown(summary), images),
                             key=artifact_key(run_name, "eval-summary"))
    return summary


def artifact_rows(rows: list[dict]) -> list[dict]:
    """The summary's rows as the Prefect table shows them: the metric's header and its formatted value."""
    return [{**r, "metric": metric_spec(r["metric"]).header, "value": metric_spec(r["metric"]).cell(r["value"])}
            for r in rows]


def summary_markdown(summary: dict, show_cached: bool = True) -> str:
    """The results table: real floor, teacher N-step, teacher 1-step, DMD student; one column per metric; rows read
    from the root's teacher baselines say "(cached)" when `show_cached`."""
    by = {(r["model"], r["steps"], r["metric"]): r["value"] for r in summary["rows"]}
    cached = {(r["model"], r["steps"]) for r in summary["rows"] if r.get("cached") and show_cached}
    metrics = [m for m in METRICS if any(k[2] == m for k in by)] or ["fd", "accuracy"]
    lines = ["| model | steps | " + " | ".join(METRICS[m].header for m in metrics) + " |",
             "|---|---|" + "---|" * len(metrics)]
    order = sorted({(m, s) for m, s, _ in by}, key=lambda k: (["real", "teacher", "student"].index(k[0]), -k[1]))
    for m, s in order:
        name = {"real": "real floor (two halves)", "teacher": f"teacher {s}-step", "student": f"DMD {s}-step"}[m]
        name += " (cached)" if (m, s) in cached else ""
        cells = [METRICS[metric].cell(by.get((m, s, metric), float("nan"))) for metric in metrics]
        lines.append(f"| {name} | {s} | " + " | ".join(cells) + " |")
    if summary.get("note"):
        lines.append(f"\n{summary['note']}")
    if any(k[2] == "accuracy" for k in by):
        lines.append("\nA one-step teacher can be classified well (its blurry digits keep their class) while its "
                     "FD is poor: accuracy measures agreement with the requested class, FD the whole distribution.")
    return "\n".join(lines) + (f"\n\nsample grid: {summary['grid']}\n" if summary.get("grid") else "\n")

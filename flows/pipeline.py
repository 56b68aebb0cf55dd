"""The Prefect flow `dmd`: teacher -> pairs -> real -> distill -> export -> evaluate, each stage idempotent
(`real` does nothing without `data.real`)."""
from __future__ import annotations

from typing import Any, Literal, Optional, Union

from prefect import flow, get_run_logger
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.futures import as_completed
from prefect.task_runners import ThreadPoolTaskRunner

from tasks.config import STAGES, PipelineConfig, load_config
from flows.credentials import apply_storage
from flows.crashed import claim_run
from flows.preflight import preflight
from flows.runners import one_gpu_per_task, pairs_task_runner
from storage.layout import CONFIG, run_store
from storage.store import sweep_temporaries
from tasks.distill import distill_task
from tasks.evaluate import evaluate_task
from tasks.export import export_task
from tasks.pairs import pairs_shard_task, plan_pairs, record_shards
from tasks.real import real_task
from tasks.stages import artifact_key
from tasks.teacher import teacher_task

Stage = Literal["teacher", "pairs", "real", "distill", "export", "evaluate"]


def resolve_config(preset, config, overrides, root: str, run_name: Optional[str]) -> tuple[PipelineConfig, str]:
    """The given preset/config/overrides; with none given, the config an existing run was made with."""
    explicit = preset is not None or config is not None or bool(overrides)
    cfg = load_config(preset, config, overrides)
    apply_storage(cfg.storage)  # endpoint and credentials before the root is touched
    run_name = run_name or cfg.name
    store = run_store(root, run_name)
    if not explicit and store.exists(CONFIG):
        cfg = PipelineConfig.model_validate(store.read_json(CONFIG))
    return cfg, run_name


def save_config(root: str, run_name: str, cfg: PipelineConfig) -> None:
    """Write the resolved config into the run folder (only when it changed, so reruns rewrite nothing)."""
    store = run_store(root, run_name)
    data = cfg.model_dump(mode="json")
    if not store.exists(CONFIG) or store.read_json(CONFIG) != data:
        store.write_json(CONFIG, data)


def recover_run(root: str, run_name: str, logger) -> None:
    """What a killed earlier run left: temporary files of its writers, and its flow run still RUNNING."""
    store = run_store(root, run_name)
    for path in sweep_temporaries(store):
        logger.info("removed %s (left by a killed writer)", path)
    for name in claim_run(store.root_url):
        logger.warning("flow run %s of this run was still RUNNING with its process gone: marked crashed", name)


def pairs_stage(root: str, run_name: str, force: bool) -> int:
    """Map one task per missing shard; the manifest is rewritten as each shard completes."""
    todo, records = plan_pairs(root, run_name, force)
    if not todo:
        record_shards(root, run_name, records, complete=True)
        return 0
    total = len(todo) + len(records)
    artifact = create_progress_artifact(100.0 * len(records) / total, key=artifact_key(run_name, "pairs"),
                                        description="pair shards written")
    futures = [pairs_shard_task.submit(root, run_name, shard_id) for shard_id in todo]
    for future in as_completed(futures):
        records.append(future.result())
        record_shards(root, run_name, records)
        update_progress_artifact(artifact, 100.0 * len(records) / total)
    record_shards(root, run_name, records, complete=True)
    return len(todo)


@flow(name="dmd-pairs", log_prints=True)
def pairs_subflow(root: str, run_name: str, force: bool = False) -> int:
    """The pairs stage under the task runner of `pairs.runner` (a subflow carries its own runner)."""
    cfg = PipelineConfig.model_validate(run_store(root, run_name).read_json(CONFIG))
    with one_gpu_per_task(cfg):
        return pairs_stage(root, run_name, force)


@flow(name="dmd", log_prints=True, task_runner=ThreadPoolTaskRunner(max_workers=2))
def dmd(preset: Optional[str] = None, config: Union[dict[str, Any], str, None] = None, root: str = "./artifacts",
        run_name: Optional[str] = None, stages: Optional[list[Stage]] = None, force: bool = False,
        overrides: Optional[list[str]] = None, evaluate_all_checkpoints: bool = False) -> dict:
    """Distill a diffusion teacher into a one-step generator; `stages` selects a subset (default all)."""
    cfg, run_name = resolve_config(preset, config, overrides, root, run_name)
    default = [s for s in STAGES if s != "real" or cfg.data.real is not None]
    selected = [s for s in STAGES if s in (stages or default)]
    preflight(cfg, root, run_name, selected if stages else None, force)
    logger = get_run_logger()
    recover_run(root, run_name, logger)
    save_config(root, run_name, cfg)
    logger.info("run %s at %s: stages %s", run_name, run_store(root, run_name).root_url, ",".join(selected))
    out: dict = {"run_name": run_name, "root": run_store(root, run_name).root_url, "stages": selected}
    if "teacher" in selected:
        out["teacher"] = teacher_task(root, run_name, force)
    if "pairs" in selected:
        runner = pairs_task_runner(cfg)
        out["pairs_shards_written"] = (pairs_stage(root, run_name, force) if runner is None else
                                       pairs_subflow.with_options(task_runner=runner)(root, run_name, force))
    if "real" in selected:
        out["real_shards_written"] = real_task(root, run_name, force)
    if "distill" in selected:
        out["distill_steps"] = distill_task(root, run_name, force)
    if "export" in selected:
        out["export"] = export_task(root, run_name, force)
    if "evaluate" in selected:
        out["evaluate"] = evaluate_task(root, run_name, evaluate_all_checkpoints)
    return out

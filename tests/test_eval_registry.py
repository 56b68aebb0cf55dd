"""Protocols and metrics as registries: every protocol's metrics have a MetricSpec that tables, plots, report and
the Prefect table read; an unknown protocol is refused in one line naming the field."""
import pytest

from dmd_core.protocols import METRICS, PROTOCOLS, metric_spec


def test_every_protocol_metric_is_registered_and_formats_as_the_tables_show_it():
    assert all(m in METRICS for p in PROTOCOLS.values() for m in p.metrics)
    assert PROTOCOLS["coco30k"].metrics == ("fid", "clip") and PROTOCOLS["digits"].metrics == ("fd", "accuracy")
    assert PROTOCOLS["cifar10-50k"].metrics == ("fid",) and not PROTOCOLS["cifar10-50k"].text
    assert [metric_spec(m).cell(v) for m, v in (("fid", 12.3456), ("accuracy", 0.9876), ("clip", 0.31234))] == \
        ["12.35", "98.8%", "0.3123"]
    assert metric_spec("fid").lower_is_better and not metric_spec("clip").lower_is_better
    other = metric_spec("precision_at_k")  # unregistered: printed, direction unknown
    assert other.cell(0.123456) == "0.1235" and other.lower_is_better is None


def test_prefect_table_and_summary_read_the_registry():
    from tasks.evaluate import artifact_rows, summary_markdown

    rows = [{"model": "teacher", "steps": 50, "metric": "fid", "value": 20.0, "n_samples": 8, "checkpoint_step": -1,
             "precision": "bf16", "cached": True},
            {"model": "student", "steps": 1, "metric": "clip", "value": 0.3, "n_samples": 8, "checkpoint_step": 4,
             "precision": "bf16", "cached": False}]
    assert [(r["metric"], r["value"]) for r in artifact_rows(rows)] == [("FID", "20.00"), ("CLIP score", "0.3000")]
    table = summary_markdown({"rows": rows, "grid": None}).splitlines()
    assert table[0] == "| model | steps | FID | CLIP score |"
    assert table[2] == "| teacher 50-step (cached) | 50 | 20.00 | nan |"


def test_an_unknown_protocol_is_refused_naming_the_field():
    from dmd_core.config import ConfigError
    from tasks.config import load_config

    with pytest.raises(ConfigError, match="evaluate.protocol") as err:
        load_config("sd-tiny", overrides=["evaluate.protocol=coco5k"])
    assert "coco30k" in str(err.value) and "\n" not in str(err.value)


def test_teacher_baseline_keys_change_with_what_the_numbers_depend_on_only(tmp_path):
    from storage.layout import run_store
    from tasks.config import load_config
    from tasks.eval_cache import TeacherBaselines
    from tasks.stages import TEACHER_STAGE

    root = str(tmp_path)
    store = run_store(root, "a")
    store.write_json(TEACHER_STAGE.marker, {"hash": "h", "content": "c1"})

    def key(overrides=(), content="c1", n=8, precision="bf16", steps=50, run="a"):
        s = run_store(root, run)
        s.write_json(TEACHER_STAGE.marker, {"hash": "h", "content": content})
        cfg = load_config("sd-tiny", overrides=list(overrides))
        return TeacherBaselines(root, s, cfg, PROTOCOLS["coco30k"], n, precision, "ref").key(
            "teacher", steps, cfg.pairs.solver, cfg.pairs.guidance)

    base = key()
    # another run on the same root, another teacher path with the same files, more distill steps: same key
    assert key(run="b") == base
    assert key(["teacher.path=/elsewhere/sd-tiny", "distill.steps=99"]) == base
    # the folder's content, n, precision, steps, guidance, seed: another key each
    changed = [key(content="c2"), key(n=9), key(precision="fp32"), key(steps=25), key(["pairs.guidance=2.5"]),
               key(["evaluate.seed=7"])]
    assert len({base, *changed}) == 7


def test_the_fast_path_is_taken_on_cuda_in_half_precision_from_2000_samples_or_when_asked():
    import torch

    from tasks.config import load_config
    from tasks.eval_protocols import FAST_FROM, fast_path

    cuda, cpu = torch.device("cuda"), torch.device("cpu")

    def cfg(*overrides):
        return load_config("sd-tiny", overrides=list(overrides))

    assert fast_path(cfg(), cuda, FAST_FROM) and not fast_path(cfg(), cuda, FAST_FROM - 1)
    assert fast_path(cfg("evaluate.fast=true"), cuda, 8) and not fast_path(cfg("evaluate.fast=false"), cuda, 30_000)
    assert not fast_path(cfg("evaluate.fast=true"), cpu, 30_000)  # CUDA only
    assert not fast_path(cfg("evaluate.fast=true", "evaluate.precision=fp32"), cuda, 30_000)  # half precision only
    # the new fields at their defaults leave the evaluate section's hash as it was; workers never enters it
    base = cfg().section_hash("evaluate")
    assert "fast" not in cfg().evaluate.model_dump() and cfg("evaluate.workers=3").section_hash("evaluate") == base
    assert cfg("evaluate.clip_precision=tf32").section_hash("evaluate") != base

"""The `dmd` command line: run the pipeline, deploy it, sample from an export."""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path
from typing import List, Optional

import typer
import yaml

from dmd_core.config import ConfigError

from tasks.config import DEFAULT_PRESET, STAGES, load_config, preset_names

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Distribution Matching Distillation of diffusion models into one-step generators.")
REPO = Path(__file__).resolve().parent.parent
DEBUG = {"on": False}  # set by --debug: expected errors print their traceback too


@app.callback()
def options(debug: bool = typer.Option(False, "--debug", help="print the traceback of expected errors too")) -> None:
    """Options of every command."""
    DEBUG["on"] = debug


def fail(message: str, code: int = 2) -> None:
    """Print one line to stderr (after the traceback being handled, with --debug) and exit non-zero."""
    if DEBUG["on"] and sys.exc_info()[0] is not None:
        typer.echo(traceback.format_exc().rstrip(), err=True)
    first = str(message).strip().splitlines()
    typer.echo(f"error: {first[0] if first else message}", err=True)
    raise typer.Exit(code)


def parse_stages(stages: Optional[str]) -> Optional[list[str]]:
    if not stages:
        return None
    chosen = [s.strip() for s in stages.split(",") if s.strip()]
    unknown = [s for s in chosen if s not in STAGES]
    if unknown or not chosen:
        fail(f"--stages: unknown stage {', '.join(unknown) or '(none)'}; choose from {','.join(STAGES)}")
    return chosen


@app.command()
def run(
    preset: Optional[str] = typer.Option(None, help=f"preset in configs/ ({', '.join(preset_names())}); default digits"),
    config: Optional[Path] = typer.Option(None, help="YAML config file (instead of a preset)"),
    root: str = typer.Option("./artifacts", help="artifact root URL: a path, file://, memory://, s3://, gs://"),
    run_name: Optional[str] = typer.Option(None, help="run folder under the root; default the config's name"),
    stages: Optional[str] = typer.Option(None, help=f"comma-separated subset of {','.join(STAGES)}; default all (real only with data.real)"),
    set_: List[str] = typer.Option([], "--set", help="override a config value, e.g. --set distill.lr=1e-5"),
    force: bool = typer.Option(False, help="recompute stages even if complete"),
    all_checkpoints: bool = typer.Option(False, help="evaluate every checkpoint not yet in the results table"),
    dry_run: bool = typer.Option(False, "--dry-run", help="print the resolved config and exit"),
    s3_endpoint: Optional[str] = typer.Option(None, help="S3-compatible endpoint (MinIO), = --set "
                                                         "storage.endpoint_url=URL"),
) -> None:
    """Run the pipeline (teacher, pairs, distill, export, evaluate) as the Prefect flow `dmd`."""
    if s3_endpoint:
        set_ = [*set_, f"storage.endpoint_url={s3_endpoint}"]
    try:
        cfg = load_config(preset, str(config) if config else None, set_)
    except ConfigError as err:
        fail(str(err))
    chosen = parse_stages(stages)
    if dry_run:
        typer.echo(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False).rstrip())
        return
    # Checked before torch, diffusers or Prefect is imported: bad input is refused in about a second.
    from flows.preflight import PreflightError, preflight
    from storage.endpoints import configure_s3

    configure_s3(cfg.storage.endpoint_url)
    try:  # before a Prefect server starts or anything is written
        preflight(cfg, root, run_name, chosen, force)
    except PreflightError as err:
        fail(str(err))
    from flows.server import ServerStartError, start_temporary_server

    try:
        start_temporary_server()
    except ServerStartError as err:
        fail(str(err))
    from flows.pipeline import dmd
    from tasks.evaluate import summary_markdown

    try:
        # Pass what the user gave (not the resolved dict): with none, the flow reuses the run's stored config.
        out = dmd(preset=preset, config=str(config) if config else None, overrides=list(set_) or None, root=root,
                  run_name=run_name, stages=chosen, force=force, evaluate_all_checkpoints=all_checkpoints)
    except Exception as err:  # the flow already logged the traceback; say it in one line and exit non-zero
        fail(f"{type(err).__name__}: {err}", code=1)
    typer.echo(f"\nrun {out['run_name']} at {out['root']}: stages {','.join(out['stages'])} complete")
    if "evaluate" in out:
        typer.echo(summary_markdown(out["evaluate"]))


@app.command()
def deploy(pool: str = typer.Option("dmd", help="process work pool the deployments run on"),
           gpu_limit: Optional[int] = typer.Option(None, min=1, help="slots of the `gpu` global concurrency limit "
                                                   "(created if missing, resized if given); default: the GPUs "
                                                   "visible here, at least 1")) -> None:
    """Register every deployment in prefect.yaml and create the `gpu` concurrency limit that the pair shard tasks,
    distill (a slot per rank) and evaluate hold."""
    from tasks.gpu_slots import GPU_LIMIT

    env = {**os.environ, "DMD_WORK_POOL": pool, "DMD_PROJECT_DIR": str(REPO)}
    prefect = [sys.executable, "-m", "prefect", "--no-prompt"]
    if subprocess.call([*prefect, "work-pool", "inspect", pool], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL) != 0:
        fail(f"--pool: work pool {pool!r} not found; create it with `prefect work-pool create {pool} --type process`")
    exists = subprocess.call([*prefect, "gcl", "inspect", GPU_LIMIT], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL) == 0
    if not exists or gpu_limit is not None:
        slots = str(gpu_limit or visible_gpus())
        rc = subprocess.call([*prefect, "gcl", "update" if exists else "create", GPU_LIMIT, "--limit", slots],
                             cwd=REPO, env=env)
        if rc != 0:
            raise typer.Exit(rc)
    with tempfile.TemporaryDirectory(prefix="dmd-deploy-") as tmp:
        prefect_file = pool_prefect_file(pool, Path(tmp))
        raise typer.Exit(subprocess.call([*prefect, "deploy", "--all", "--prefect-file", str(prefect_file)],
                                         cwd=REPO, env=env))


def visible_gpus() -> int:
    """GPUs this process sees, at least 1 (the size of the `gpu` limit when --gpu-limit is not given)."""
    import torch

    return max(1, torch.cuda.device_count())


def pool_prefect_file(pool: str, folder: Path) -> Path:
    """prefect.yaml with every deployment on `pool` (`prefect deploy --all` ignores --pool for several)."""
    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    for deployment in spec.get("deployments", []):
        deployment["work_pool"] = {**(deployment.get("work_pool") or {}), "name": pool}
    out = folder / "prefect.yaml"
    out.write_text(yaml.safe_dump(spec, sort_keys=False))
    return out


@app.command()
def sample(
    export: Path = typer.Option(..., help="an exported pipeline folder"),
    n: int = typer.Option(64, min=1, help="number of samples (text students: one per prompt, cycling)"),
    prompt: Optional[str] = typer.Option(None, help="text students: the prompt"),
    prompts: Optional[Path] = typer.Option(None, help="text students: a caption file (.txt one a line, COCO json...)"),
    output: Path = typer.Option(Path("grid.png"), "-o", "--output", help="PNG grid to write"),
    seed: int = typer.Option(0, help="noise seed"),
    device: str = typer.Option("cpu", help="cpu or cuda"),
    compile: bool = typer.Option(False, "--compile", help="cuda: torch.compile the UNet and decoder (CUDA graphs; "
                                                          "pays off from a few hundred images on)"),
    guidance_scale: Optional[float] = typer.Option(None, help="students distilled over a guidance range: the w to "
                                                               "run at (default: the export's, in dmd.json)"),
) -> None:
    """Sample a grid from an export: classes 0, 1, 2, ... for class-conditional models, prompts for text ones."""
    import json

    index = export / "model_index.json"
    if not index.is_file():
        fail(f"--export: {index} not found (not an exported pipeline folder)")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        fail(f"--device: choose cpu or cuda, got {device!r}")
    out = output.expanduser().absolute()
    check_output_folder(out)
    try:
        kind = json.loads(index.read_text()).get("_class_name")
    except ValueError as err:
        fail(f"--export: {index} is not valid JSON ({err})")
    from dmd_core.families import family_of_pipeline

    family = family_of_pipeline(kind)
    if family is None:
        fail(f"--export: {index} names the pipeline {kind!r}, which no teacher family exports")
    import torch

    from storage import ArtifactStore
    from storage.images import grid_png

    if device != "cpu" and not torch.cuda.is_available():
        fail(f"--device {device}: no CUDA device is available; use --device cpu")
    g = torch.Generator(device).manual_seed(seed)
    texts, meta = None, export / "dmd.json"
    if family.conditioning == "text":
        from storage.captions import read_captions

        texts = [prompt] if prompt else (read_captions(str(prompts)) if prompts else None)
        if not texts:
            fail("--prompt or --prompts is required for a text-to-image export")
        texts = [texts[i % len(texts)] for i in range(n)]
        if not meta.is_file():
            fail(f"--export: {meta} not found (it says how many steps the student takes)")
    info = json.loads(meta.read_text()) if meta.is_file() else {}
    try:
        pipe = family.load_export(kind, str(export)).to(device)
        if device != "cpu":  # fp16, NHWC, fused QKV projections (and torch.compile with --compile)
            from dmd_core.inference import fast_pipeline

            pipe = fast_pipeline(pipe, "reduce-overhead" if compile else "none")
    except (OSError, ValueError, RuntimeError, KeyError) as err:  # missing or damaged files, unreadable weights
        fail(f"--export: cannot load {export}: {type(err).__name__}: {err}")
    if family.conditioning == "text" and guidance_scale is None:
        guidance_scale = float(info.get("guidance_scale", 1.0))
    images = family.sample_export(pipe, kind, texts, n, int(info.get("num_inference_steps", 1)), guidance_scale, g)
    try:
        ArtifactStore("file://" + str(out.parent)).write_bytes(out.name, grid_png(images.float().cpu() * 2 - 1))
    except OSError as err:
        fail(f"-o {out}: cannot write ({err.strerror or err})")
    typer.echo(f"wrote {n} samples to {out}")


def check_output_folder(out: Path) -> None:
    """-o names a file in an existing, writable folder (checked before a model loads)."""
    if out.is_dir():
        fail(f"-o {out}: is a folder; give a .png file name")
    if not out.parent.is_dir():
        fail(f"-o {out}: folder {out.parent} does not exist")
    try:
        tempfile.TemporaryFile(dir=out.parent).close()
    except OSError as err:
        fail(f"-o {out}: cannot write in {out.parent} ({err.strerror or err})")


@app.command("make-teacher")
def make_teacher(
    tiny: str = typer.Option(..., help="which tiny random teacher: sd (Stable Diffusion layout), sdxl (Stable "
                                       "Diffusion XL layout), sd3 (SD3, rectified flow), flux (FLUX.1-dev) or "
                                       "pixel (UNet2DModel)"),
    out: Path = typer.Option(..., help="folder to write (a diffusers layout that teacher.path can point to)"),
    seed: int = typer.Option(0, help="weight init seed"),
    prediction_type: str = typer.Option("epsilon", help="epsilon or v_prediction (sd3 and flux predict the flow "
                                                        "velocity whatever this says)"),
) -> None:
    """Write a tiny random teacher of a real architecture (offline, seconds) for smoke runs and tests."""
    from dmd_core.tiny import TINY_TEACHERS

    if tiny not in TINY_TEACHERS:
        fail(f"--tiny: choose {', '.join(TINY_TEACHERS)}, got {tiny!r}")
    if prediction_type not in ("epsilon", "v_prediction", "sample"):
        fail(f"--prediction-type: choose epsilon, v_prediction or sample, got {prediction_type!r}")
    if out.exists() and any(out.iterdir()):
        fail(f"--out: {out} exists and is not empty")
    TINY_TEACHERS[tiny](out, prediction_type=prediction_type, seed=seed)
    typer.echo(f"wrote a tiny {tiny} teacher to {out}")


@app.command("train-teacher")
def train_teacher_cmd(
    preset: str = typer.Option(DEFAULT_PRESET, help="preset whose data/teacher sections define the teacher"),
    out: Path = typer.Option(Path("teachers") / DEFAULT_PRESET, help="folder to write (unet/, scheduler/, dmd_teacher.json)"),
    set_: List[str] = typer.Option([], "--set", help="override a config value"),
) -> None:
    """Train the digits teacher and write it where the `teacher` stage finds it (matched by config hash)."""
    import json
    import time

    import torch

    from dmd_core.digits import load_digits, train_teacher

    try:
        cfg = load_config(preset, None, set_)
    except ConfigError as err:
        fail(str(err))
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    t0 = time.time()
    images, labels = load_digits()
    unet, scheduler = train_teacher(cfg.data, cfg.teacher, images, labels)
    unet.save_pretrained(out / "unet")
    scheduler.save_pretrained(out / "scheduler")
    command = " ".join(["dmd", "train-teacher", "--preset", preset, "--out", str(out),
                        *[f"--set {s}" for s in set_]])
    meta = {"hash": cfg.section_hash("data", "teacher"), "command": command, "seconds": round(time.time() - t0, 1),
            "torch": torch.__version__, "data": cfg.data.model_dump(), "teacher": cfg.teacher.model_dump()}
    (out / "dmd_teacher.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    typer.echo(f"wrote {out} (config hash {meta['hash']}) in {meta['seconds']} s")


@app.command("report")
def report_cmd(
    run_name: str = typer.Argument(..., metavar="RUN", help="run folder under the root"),
    root: str = typer.Option("./artifacts", help="artifact root URL: a path, file://, memory://, s3://, gs://"),
) -> None:
    """Print a run's latest evaluation table and write eval/trend.png and eval/loss.png into the run."""
    from tasks.report import report

    try:
        out = report(root, run_name)
    except (FileNotFoundError, ValueError) as err:
        fail(str(err))
    typer.echo(out["table"].rstrip())
    for name, url in out["images"].items():
        typer.echo(f"{name}: {url}")


@app.command("eval")
def eval_cmd(
    folder: Path = typer.Argument(..., metavar="FOLDER", help="a diffusers pipeline folder (an export, or a "
                                                              "published model kept locally)"),
    protocol: str = typer.Option(..., help="evaluation protocol: coco30k, coco10k, cifar10-50k"),
    steps: int = typer.Option(1, min=1, help="num_inference_steps the pipeline is called with"),
    guidance: Optional[float] = typer.Option(None, help="guidance_scale it is called with (default: the pipeline's)"),
    root: str = typer.Option("./artifacts", help="artifact root URL; rows go to ROOT/NAME/eval/results.parquet"),
    name: Optional[str] = typer.Option(None, help="the rows' run name (default: the folder's name)"),
    set_: List[str] = typer.Option([], "--set", help="an evaluate setting, e.g. --set evaluate.captions=PATH"),
    device: str = typer.Option("auto", help="cpu, cuda or auto"),
) -> None:
    """Score any diffusers pipeline folder at a protocol, on the evaluate stage's noise and prompts."""
    import torch
    from pydantic import ValidationError

    from dmd_core.config import EvaluateConfig
    from dmd_core.protocols import PROTOCOLS
    from tasks.eval_pipeline import pipeline_class, run_eval_pipeline

    if protocol not in PROTOCOLS or PROTOCOLS[protocol].classifier:
        fail(f"--protocol: choose one of {', '.join(n for n, p in PROTOCOLS.items() if not p.classifier)}, "
             f"got {protocol!r}")
    if device not in ("cpu", "cuda", "auto"):
        fail(f"--device: choose cpu, cuda or auto, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        fail("--device cuda: no CUDA device is available; use --device cpu")
    settings = {}
    for item in set_:
        field, sep, value = item.partition("=")
        if not sep:
            fail(f"--set {item}: expected evaluate.FIELD=VALUE")
        settings[field.removeprefix("evaluate.")] = yaml.safe_load(value)
    try:
        evaluate = EvaluateConfig(**settings, protocol=protocol)
        pipeline_class(folder)
    except ValidationError as err:
        e = err.errors()[0]
        fail(f"--set evaluate.{'.'.join(str(p) for p in e['loc'])}: {e['msg']}")
    except (FileNotFoundError, ValueError) as err:
        fail(f"FOLDER: {err}")
    on = torch.device("cuda" if device == "cuda" or (device == "auto" and torch.cuda.is_available()) else "cpu")
    try:
        rows = run_eval_pipeline(str(folder), root, name or folder.resolve().name, protocol, steps, guidance,
                                 evaluate, on)
    except (FileNotFoundError, ValueError, NotImplementedError) as err:
        fail(str(err))
    for r in rows:
        typer.echo(f"{r['run']} | {r['model']} {r['steps']}-step | {r['metric']} = {r['value']:.6g} "
                   f"| n = {r['n_samples']}")


@app.command()
def presets() -> None:
    """List the presets shipped in configs/."""
    for name in preset_names():
        typer.echo(name)


def main() -> None:
    app()


if __name__ == "__main__":
    main()

"""Each stage's inputs (the config sections hashed into its key), outputs (store keys) and done marker, in one place."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from dmd_core.config import stable_hash

from tasks.config import PipelineConfig
from dmd_core.datasets import DATASETS
from storage import ArtifactStore, read_manifest
from storage.checkpoints import checkpoint_keys, list_checkpoints
from storage.layout import EVAL_DIR, EXPORT, PAIRS_DIR, PAIRS_MANIFEST, REAL_DIR, REAL_MANIFEST, TEACHER, done_marker
from storage.stream import manifest_fingerprint

# Changing only these lets a run continue from its checkpoints (e.g. raise distill.steps to train longer); the
# process count and the speed settings (compile, channels_last: bf16 rounding at most) change how, not what.
RESUMABLE_CHANGES = {"steps", "checkpoint_every", "sample_every", "log_every",
                     "world_size", "launcher", "nnodes", "rdzv_endpoint", "rdzv_id", "compile", "channels_last",
                     "on_new_pairs"}


@dataclass(frozen=True)
class Stage:
    """A stage: the config sections it depends on, the store prefixes it writes, its done marker."""

    name: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    ignore: tuple[tuple[str, str], ...] = ()  # (section, field) of the inputs that other stages read, not this one

    @property
    def marker(self) -> str:
        return done_marker(self.name)

    def key(self, cfg: PipelineConfig) -> str:
        """Hash of every input: the stage is done only while its marker carries this key."""
        ignore: dict[str, set[str]] = {}
        for section, name in self.ignore:
            ignore.setdefault(section, set()).add(name)
        return cfg.section_hash(*self.inputs, ignore=ignore)

    def is_done(self, store: ArtifactStore, cfg: PipelineConfig) -> bool:
        return store.exists(self.marker) and store.read_json(self.marker).get("hash") == self.key(cfg)

    def unmark(self, store: ArtifactStore) -> None:
        """Forget completion (before a recompute, so an interrupted one is never trusted)."""
        store.delete(self.marker, missing_ok=True)

    def mark(self, store: ArtifactStore, cfg: PipelineConfig, **extra) -> None:
        store.write_json(self.marker, {"hash": self.key(cfg), **extra})


TEACHER_STAGE = Stage("teacher", ("data", "teacher"), (TEACHER,), ignore=(("data", "real"),))
PAIRS_STAGE = Stage("pairs", ("data", "teacher", "pairs"), (PAIRS_DIR,), ignore=(("data", "real"),))
REAL_STAGE = Stage("real", ("data", "teacher"), (REAL_DIR,))
DISTILL_STAGE = Stage("distill", ("data", "teacher", "pairs", "distill"), ("distill",))
EXPORT_STAGE = Stage("export", ("data", "teacher", "pairs", "distill", "export"), (EXPORT,))
EVALUATE_STAGE = Stage("evaluate", ("data", "teacher", "pairs", "distill", "evaluate"), (EVAL_DIR,))
STAGE_SPECS = {s.name: s for s in (TEACHER_STAGE, PAIRS_STAGE, REAL_STAGE, DISTILL_STAGE, EXPORT_STAGE,
                                   EVALUATE_STAGE)}


def resume_key(store: ArtifactStore, cfg: PipelineConfig, step: Optional[int] = None) -> str:
    """Key stored with each checkpoint, `<config>-<pairs>[-<real>]`: the hash of the inputs that must match to resume
    from it, the fingerprint of the pair set it trained on (GPU pairs are not bit-stable: pairs regenerated under
    the same config are another set), and where the GAN reads data.real the real shards'. `step` is the checkpoint's: with distill.phases the key names only the
    phases begun before it (None: the run's last checkpoint, every phase)."""
    return resume_keys(store, cfg)(step)


def resume_keys(store: ArtifactStore, cfg: PipelineConfig) -> Callable[[Optional[int]], str]:
    """step -> `resume_key(store, cfg, step)`, each manifest read once."""
    fingerprints: dict[str, str] = {}

    def fingerprint(manifest: str) -> str:
        if manifest not in fingerprints:
            fingerprints[manifest] = manifest_fingerprint(read_manifest(store, manifest))[:16]
        return fingerprints[manifest]

    def key(step: Optional[int] = None) -> str:
        pairs = fingerprint(PAIRS_MANIFEST) if pairs_used(cfg, step) else "unused"
        real = f"-{fingerprint(REAL_MANIFEST)}" if uses_real_stage(cfg, step) else ""
        return f"{config_resume_hash(cfg, step)}-{pairs}{real}"

    return key


def config_resume_hash(cfg: PipelineConfig, step: Optional[int] = None) -> str:
    """The config part of `resume_key`: the distill section but for RESUMABLE_CHANGES, and of distill.phases only
    those begun before `step`, each as its first step and the settings it changes (`phases_begun`). So changing a
    phase leaves the checkpoints made before it began usable, and those after it not; lengthening the running
    phase (with distill.steps) continues it. Without phases it is the hash it always was; the real stage's key
    joins it only where the GAN reads data.real."""
    d = cfg.distill
    data = {"upstream": PAIRS_STAGE.key(cfg),
            "distill": d.model_dump(mode="json", exclude=RESUMABLE_CHANGES | {"phases"})}
    if d.phases:
        data["phases"] = d.phases_begun(step)
    if uses_real_stage(cfg, step):
        data["real"] = REAL_STAGE.key(cfg)
    return stable_hash(data)


def gan_used(cfg: PipelineConfig, step: Optional[int] = None) -> bool:
    """Whether distill trains the GAN in a phase begun before `step` (None: at all)."""
    d = cfg.distill
    step = step if d.phases else None
    return any(d.phase_config(k).gan.enabled for k, start in enumerate(d.phase_starts()) if step is None or start < step)


def uses_real_stage(cfg: PipelineConfig, step: Optional[int] = None) -> bool:
    """Whether distill's GAN reads the `real` stage's shards (data.real given and the GAN on) before `step`."""
    return cfg.data.real is not None and gan_used(cfg, step)


def pairs_used(cfg: PipelineConfig, step: Optional[int] = None) -> bool:
    """Whether distill reads the pairs before `step` (None: at all): for the regression loss, or as the GAN's real
    images when there is neither data.real nor a named dataset."""
    no_real = cfg.data.real is None and DATASETS.get(cfg.data.name) is None
    return cfg.distill.regression != "none" or (gan_used(cfg, step) and no_real)


def resumable_checkpoints(store: ArtifactStore, cfg: PipelineConfig) -> list[tuple[int, str]]:
    """(step, key) of the complete checkpoints this config may resume from, ascending: each written under the
    resume key of its own step (without phases: the one key's)."""
    if not cfg.distill.phases:
        key = resume_key(store, cfg)
        return [(s, key) for s in list_checkpoints(store, key)]
    key_at = resume_keys(store, cfg)
    return sorted((s, k) for k, steps in checkpoint_keys(store).items() for s in steps if k == key_at(s))


def artifact_key(run_name: str, what: str) -> str:
    """A Prefect artifact key (lowercase letters, digits, dashes) for one run's `what`."""
    return f"dmd-{what}-" + "".join(c if c.isalnum() else "-" for c in run_name.lower())

"""Each stage's inputs (the config sections hashed into its key), outputs (store keys) and done marker, in one place."""
from __future__ import annotations

from dataclasses import dataclass

from dmd_core.config import stable_hash

from tasks.config import PipelineConfig
from dmd_core.datasets import DATASETS
from storage import ArtifactStore, read_manifest
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


def resume_key(store: ArtifactStore, cfg: PipelineConfig) -> str:
    """Key stored with each checkpoint, `<config>-<pairs>`: the hash of the inputs that must match to resume from
    it, and the fingerprint of the pair set it trained on (GPU pairs are not bit-stable: pairs regenerated under
    the same config are another set)."""
    return f"{config_resume_hash(cfg)}-{pairs_fingerprint(store, cfg)}"


def config_resume_hash(cfg: PipelineConfig) -> str:
    """The config part of `resume_key`."""
    parts = {"upstream": PAIRS_STAGE.key(cfg),
             "distill": cfg.distill.model_dump(mode="json", exclude=RESUMABLE_CHANGES)}
    if uses_real_stage(cfg):  # the GAN's real images (absent otherwise: hashes as before)
        parts["real"] = REAL_STAGE.key(cfg)
    return stable_hash(parts)


def uses_real_stage(cfg: PipelineConfig) -> bool:
    """Whether distill's GAN reads the `real` stage's shards (data.real given and the GAN on)."""
    return cfg.data.real is not None and cfg.distill.gan.enabled


def pairs_fingerprint(store: ArtifactStore, cfg: PipelineConfig) -> str:
    """16 hex digits of the pair manifest's fingerprint (shards, sha256, counts); "unused" when distill reads no
    pairs (no regression loss, and the GAN's real images come from the named dataset or `data.real`); with
    `data.real`, the real manifest's after a dash."""
    d, real = cfg.distill, uses_real_stage(cfg)
    uses_pairs = d.regression != "none" or (d.gan.enabled and DATASETS.get(cfg.data.name) is None and not real)
    pairs = manifest_fingerprint(read_manifest(store, PAIRS_MANIFEST))[:16] if uses_pairs else "unused"
    if real:  # and the real images' shards
        return f"{pairs}-{manifest_fingerprint(read_manifest(store, REAL_MANIFEST))[:16]}"
    return pairs


def artifact_key(run_name: str, what: str) -> str:
    """A Prefect artifact key (lowercase letters, digits, dashes) for one run's `what`."""
    return f"dmd-{what}-" + "".join(c if c.isalnum() else "-" for c in run_name.lower())

"""Each stage's inputs (the config sections hashed into its key), outputs (store keys) and done marker, in one place."""
from __future__ import annotations

from dataclasses import dataclass

from dmd_core.config import PipelineConfig, stable_hash
from storage import ArtifactStore
from storage.layout import EVAL_DIR, EXPORT, PAIRS_DIR, TEACHER, done_marker

# Changing only these lets a run continue from its checkpoints (e.g. raise distill.steps to train longer); the
# process count and the speed settings (compile, channels_last: bf16 rounding at most) change how, not what.
RESUMABLE_CHANGES = {"steps", "checkpoint_every", "sample_every", "log_every",
                     "world_size", "launcher", "nnodes", "rdzv_endpoint", "rdzv_id", "compile", "channels_last"}


@dataclass(frozen=True)
class Stage:
    """A stage: the config sections it depends on, the store prefixes it writes, its done marker."""

    name: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]

    @property
    def marker(self) -> str:
        return done_marker(self.name)

    def key(self, cfg: PipelineConfig) -> str:
        """Hash of every input: the stage is done only while its marker carries this key."""
        return cfg.section_hash(*self.inputs)

    def is_done(self, store: ArtifactStore, cfg: PipelineConfig) -> bool:
        return store.exists(self.marker) and store.read_json(self.marker).get("hash") == self.key(cfg)

    def unmark(self, store: ArtifactStore) -> None:
        """Forget completion (before a recompute, so an interrupted one is never trusted)."""
        store.delete(self.marker, missing_ok=True)

    def mark(self, store: ArtifactStore, cfg: PipelineConfig, **extra) -> None:
        store.write_json(self.marker, {"hash": self.key(cfg), **extra})


TEACHER_STAGE = Stage("teacher", ("data", "teacher"), (TEACHER,))
PAIRS_STAGE = Stage("pairs", ("data", "teacher", "pairs"), (PAIRS_DIR,))
DISTILL_STAGE = Stage("distill", ("data", "teacher", "pairs", "distill"), ("distill",))
EXPORT_STAGE = Stage("export", ("data", "teacher", "pairs", "distill", "export"), (EXPORT,))
EVALUATE_STAGE = Stage("evaluate", ("data", "teacher", "pairs", "distill", "evaluate"), (EVAL_DIR,))
STAGE_SPECS = {s.name: s for s in (TEACHER_STAGE, PAIRS_STAGE, DISTILL_STAGE, EXPORT_STAGE, EVALUATE_STAGE)}


def resume_key(cfg: PipelineConfig) -> str:
    """Hash stored with each checkpoint: the inputs that must match to resume from it."""
    return stable_hash({"upstream": PAIRS_STAGE.key(cfg),
                        "distill": cfg.distill.model_dump(mode="json", exclude=RESUMABLE_CHANGES)})


def artifact_key(run_name: str, what: str) -> str:
    """A Prefect artifact key (lowercase letters, digits, dashes) for one run's `what`."""
    return f"dmd-{what}-" + "".join(c if c.isalnum() else "-" for c in run_name.lower())

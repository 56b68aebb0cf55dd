"""Teacher baselines computed once per artifact root: their scores and preview images under `<root>/_reference/`,
beside the real-image statistics, keyed by what the numbers depend on (never by the run that made them)."""
from __future__ import annotations

import logging
from typing import Optional

import torch

from dmd_core.checkpoint import bytes_to_tensors, tensors_to_bytes
from dmd_core.config import stable_hash
from storage.layout import root_store
from tasks.launch import writer_store
from tasks.stages import TEACHER_STAGE

log = logging.getLogger("dmd.evaluate")

# evaluate fields the scores of a fixed set of images depend on (the extractors and the reference they are held to)
SCORING_FIELDS = ("reference_images", "captions", "inception_weights", "fid_mode", "clip_model", "clip_weights",
                  "clip_prefix", "clip_resize", "random_extractors", "classifier_epochs")


def teacher_identity(store, cfg) -> list:
    """The loaded teacher: its folder's content hash and the loader's settings (not where the folder came from);
    a callable teacher, which has no folder, by its factory and path."""
    marker = store.read_json(TEACHER_STAGE.marker)
    t = cfg.teacher
    loader = t.model_dump(mode="json") if t.kind == "callable" else t.model_dump(mode="json", exclude={"path", "source"})
    return [marker.get("content", marker["hash"]), loader]


class TeacherBaselines:
    """get/put of one teacher row set (scores + 8 preview images) per key, shared by every run on the root."""

    def __init__(self, root: str, store, cfg, protocol, n: int, precision: str, reference: str) -> None:
        e = cfg.evaluate
        self.cache = writer_store(root_store(root))  # rank 0 writes, under data-parallel evaluation
        self.base = [teacher_identity(store, cfg), protocol.name, int(n), precision, e.seed, e.batch_size,
                     cfg.data.name, cfg.distill.guidance, reference, e.model_dump(mode="json", include=set(SCORING_FIELDS))]

    def key(self, kind: str, steps: int, solver: str, guidance: float, timesteps: Optional[list] = None) -> str:
        """The key of a teacher row: base + (kind, solver, steps, guidance[, the generator's timesteps])."""
        return stable_hash([*self.base, kind, solver, int(steps), float(guidance), timesteps])

    def _paths(self, key: str) -> tuple[str, str]:
        return f"_reference/teacher-{key}.json", f"_reference/teacher-{key}-preview.safetensors"

    def get(self, key: str, label: str) -> Optional[tuple[dict, Optional[torch.Tensor]]]:
        """(scores, preview images or None) when computed before on this root, else None; logs "cached"."""
        meta, preview = self._paths(key)
        if not self.cache.exists(meta):
            return None
        scores = self.cache.read_json(meta)["scores"]
        log.info("evaluate: %s cached (%s), 0 images generated", label, self.cache.url(meta))
        pictures = bytes_to_tensors(self.cache.read_bytes(preview))["images"] if self.cache.exists(preview) else None
        return scores, pictures

    def put(self, key: str, label: str, scores: dict, pictures: Optional[torch.Tensor]) -> None:
        """Store a freshly computed row set; the preview first, so a present json always has its pictures."""
        meta, preview = self._paths(key)
        if pictures is not None:
            self.cache.write_bytes(preview, tensors_to_bytes({"images": pictures.contiguous()}))
        self.cache.write_json(meta, {"label": label, "scores": scores})

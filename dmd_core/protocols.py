"""Evaluation protocols: how many samples, at what resolution, against which reference (pure, no I/O).

COCO follows the official DMD2 evaluator (tianweiy/DMD2): `main/coco_eval/coco_evaluator.py` crops every image,
generated or reference, to a centred square on its short side (`CenterCropLongEdge`, from BigGAN-PyTorch) and
resizes it to `eval_res`² with PIL Lanczos before clean-FID; `main/sdxl/data_process.py` draws the COCO-10k
prompts from `captions_val2014.json` (one caption per image, numpy seed 123). The COCO-30k prompt list of the
SD1.5 runs ships as a prepared pickle (`captions_coco14_test.pkl`; its text in `main/coco_eval/
captions_coco14_test.txt`) whose sampling code is not published: `sample_captions` draws 30k with the
published 10k recipe, so our 10k list is the first 10k of our 30k list.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    import torch

Row = TypeVar("Row", bound=tuple)

# DMD2 `main/sdxl/data_process.py`: np.random.seed(123) before shuffling and sampling the COCO-10k prompts.
COCO_CAPTION_SEED = 123


@dataclass(frozen=True)
class MetricSpec:
    """How one metric is named, printed and compared by tables, plots, reports and the Prefect artifacts."""

    name: str
    header: str
    format: str  # str.format pattern of one value
    lower_is_better: bool | None  # None: direction unknown (an unregistered metric)

    def cell(self, value: float) -> str:
        """`value` as a table cell."""
        return self.format.format(value)


METRICS: dict[str, MetricSpec] = {m.name: m for m in (
    MetricSpec("fd", "FD", "{:.2f}", lower_is_better=True),  # Fréchet distance in a dataset classifier's features
    MetricSpec("fid", "FID", "{:.2f}", lower_is_better=True),  # clean-fid, Inception pool3 (Heusel et al. 2017)
    MetricSpec("accuracy", "class accuracy", "{:.1%}", lower_is_better=False),
    MetricSpec("clip", "CLIP score", "{:.4f}", lower_is_better=False),  # mean raw cosine (Hessel et al. 2021)
)}


def metric_spec(name: str) -> MetricSpec:
    """The registered spec of `name`; an unknown metric is printed with 4 significant digits, direction unknown."""
    return METRICS.get(name) or MetricSpec(name, name, "{:.4g}", lower_is_better=None)


@dataclass(frozen=True)
class Protocol:
    """One named evaluation protocol: `n` generated samples, both sets resized to `resolution`², a reference."""

    name: str
    n: int
    resolution: int
    reference: str
    class_balanced: bool = False  # class-conditional models: labels from class_balanced_labels(n, num_classes)
    caption_seed: int | None = None  # text-conditional: prompts = sample_captions(rows, n, caption_seed)
    reference_is_caption_images: bool = False  # reference = the images of the drawn captions, not a whole folder
    classifier: bool = False  # Fréchet distance and accuracy in a dataset classifier's features, not Inception's
    source: str = ""

    @property
    def text(self) -> bool:
        """Scores text-to-image models on drawn captions (FID and CLIP score)."""
        return self.caption_seed is not None

    @property
    def metrics(self) -> tuple[str, ...]:
        """The metrics of its rows, in table order (names in METRICS)."""
        return ("fd", "accuracy") if self.classifier else ("fid", "clip") if self.text else ("fid",)


PROTOCOLS: dict[str, Protocol] = {
    "coco30k": Protocol(
        name="coco30k", n=30_000, resolution=256, caption_seed=COCO_CAPTION_SEED,
        reference="all 40,504 COCO val2014 images, centre-cropped and Lanczos-resized to 256²",
        source="DMD2 experiments/sdv1.5/README.md (--total_eval_samples 30000 --eval_res 256 --ref_dir val2014)",
    ),
    "coco10k": Protocol(
        name="coco10k", n=10_000, resolution=512, caption_seed=COCO_CAPTION_SEED, reference_is_caption_images=True,
        reference="the 10,000 COCO val2014 images whose captions were drawn, centre-cropped and resized to 512²",
        source="DMD2 experiments/sdxl/README.md (--eval_res 512 --ref_dir coco10k/subset), main/sdxl/data_process.py",
    ),
    "cifar10-50k": Protocol(
        name="cifar10-50k", n=50_000, resolution=32, class_balanced=True,
        reference="a CIFAR-10 train folder the user points to (50,000 images at 32²)",
        source="DMD / DMD2 CIFAR-10 FID: 50k samples against the training set",
    ),
    "digits": Protocol(
        name="digits", n=1797, resolution=8, class_balanced=True, classifier=True,
        reference="sklearn's 1,797 8x8 digits; Fréchet distance on the DigitsClassifier features",
        source="configs/digits.yaml (evaluate.n_samples 1797)",
    ),
}


def get_protocol(name: str) -> Protocol:
    """The protocol called `name`; ValueError listing the known names otherwise."""
    if name not in PROTOCOLS:
        raise ValueError(f"unknown evaluation protocol {name!r}; use one of {', '.join(sorted(PROTOCOLS))}")
    return PROTOCOLS[name]


def sample_captions(captions_with_image_ids: Sequence[Row], n: int, seed: int = COCO_CAPTION_SEED) -> list[Row]:
    """`n` rows, one caption per image, drawn as DMD2 `main/sdxl/data_process.py` draws COCO-10k.

    Rows are tuples whose first item is the image id (e.g. `(image_id, file_name, caption)` from
    `storage.coco.read_coco_annotations`), in the order of a left join of `images` with `annotations`. With
    `rs = numpy.random.RandomState(seed)` (the legacy generator that `np.random.seed` + pandas `sample` use):
    shuffle all rows (`rs.permutation`, = `df.sample(frac=1)`), keep the first row of every image
    (`drop_duplicates`), then take the first `n` of `rs.permutation(#images)` (= `df.sample(n)`). The result
    depends only on (rows, n, seed); a smaller `n` with the same seed gives a prefix of a larger one. Drawing
    without replacement as pandas does, `n` above the number of distinct images is a ValueError.
    """
    n = int(n)
    if n < 1:
        raise ValueError(f"sample_captions: n must be positive, got {n}")
    rows = list(captions_with_image_ids)
    rs = np.random.RandomState(int(seed))
    seen: set[Any] = set()
    per_image: list[Row] = []
    for i in rs.permutation(len(rows)):
        image_id = rows[i][0]
        if image_id not in seen:
            seen.add(image_id)
            per_image.append(rows[i])
    if n > len(per_image):
        raise ValueError(f"sample_captions: asked for {n} captions, one per image, but only {len(per_image)} "
                         f"images have captions ({len(rows)} captions); lower n")
    return [per_image[i] for i in rs.permutation(len(per_image))[:n]]


def center_crop_box(width: int, height: int) -> tuple[int, int, int, int]:
    """PIL box (left, top, right, bottom) of the centred square of side min(width, height).

    torchvision `center_crop` arithmetic, which the DMD2 evaluator uses: offsets are `int(round(d / 2))`,
    Python's round-half-to-even (a 3-pixel excess puts 2 pixels before the square, not 1).
    """
    side = min(width, height)
    left, top = int(round((width - side) / 2.0)), int(round((height - side) / 2.0))
    return left, top, left + side, top + side


def center_crop_resize(image: Image.Image | np.ndarray, size: int) -> np.ndarray:
    """uint8 (size, size, 3) array: centred square crop on the short side, then PIL Lanczos to size², as DMD2.

    Mirrors `resize_and_center_crop` of DMD2 `main/coco_eval/coco_evaluator.py` (a uint8 HWC array goes
    through `Image.fromarray` first). Other modes are converted to RGB first, as clean-FID's folder loader
    does (`Image.open(path).convert('RGB')`); EXIF orientation is not applied, as there.
    """
    if size < 1:
        raise ValueError(f"center_crop_resize: size must be positive, got {size}")
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    if image.mode != "RGB":
        image = image.convert("RGB")
    square = image.crop(center_crop_box(*image.size))
    return np.asarray(square.resize((size, size), Image.Resampling.LANCZOS), dtype=np.uint8)


def class_balanced_labels(n: int, num_classes: int) -> torch.Tensor:
    """LongTensor of n labels, label i = i mod num_classes (as ClassLabels.for_index): counts differ by <= 1."""
    if n < 0 or num_classes < 1:
        raise ValueError(f"class_balanced_labels: need n >= 0 and num_classes >= 1, "
                         f"got n={n}, num_classes={num_classes}")
    import torch

    return torch.arange(int(n), dtype=torch.long) % int(num_classes)

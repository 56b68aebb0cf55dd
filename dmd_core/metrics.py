"""The digits feature classifier and Gaussian fits of its features (the Fréchet distance is clean-fid's, `dmd_core.fid`)."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def gaussian_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (rows are samples), in float64."""
    f = np.asarray(features, dtype=np.float64)
    return f.mean(0), np.cov(f, rowvar=False)


class DigitsClassifier(nn.Module):
    """Small CNN on 8x8 digits; `features` is the 64-d penultimate layer used for the Fréchet distance."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2), nn.Flatten(), nn.Linear(64 * 16, 64), nn.ReLU(),
        )
        self.head = nn.Linear(64, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def train_classifier(images: torch.Tensor, labels: torch.Tensor, epochs: int = 30, seed: int = 0,
                     batch_size: int = 128) -> DigitsClassifier:
    """Train the feature classifier on real digits (Adam 1e-3, light shift augmentation)."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = DigitsClassifier(int(labels.max()) + 1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(epochs):
        for idx in torch.randperm(images.shape[0], generator=g).split(batch_size):
            x = images[idx]
            shift = tuple(int(s) for s in torch.randint(-1, 2, (2,), generator=g))
            x = torch.roll(x, shifts=shift, dims=(2, 3))
            loss = F.cross_entropy(model(x), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return model.eval().requires_grad_(False)


@torch.no_grad()
def features_and_predictions(model: DigitsClassifier, images: torch.Tensor, batch_size: int = 1024):
    """(features (N, 64) as numpy, predicted class (N,))."""
    feats, preds = [], []
    for x in images.split(batch_size):
        f = model.features(x.float().clamp(-1, 1))
        feats.append(f)
        preds.append(model.head(f).argmax(1))
    return torch.cat(feats).numpy(), torch.cat(preds)

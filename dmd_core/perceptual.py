"""LPIPS built offline: the trunk comes from a local torchvision weight file, never a download."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import torch
from torch import nn

# torchvision file names of the ImageNet trunks LPIPS uses.
TRUNK_FILES = {"vgg": "vgg16-397923af.pth", "alex": "alexnet-owt-7be5be79.pth", "squeeze": "squeezenet1_1-b8a52dc0.pth"}


def default_trunk_path(net: str) -> Path:
    """Where torchvision would cache the trunk: $TORCH_HOME/hub/checkpoints/<file>."""
    torch_home = Path(os.environ.get("TORCH_HOME", Path.home() / ".cache" / "torch"))
    return torch_home / "hub" / "checkpoints" / TRUNK_FILES[net]


def build_lpips(net: str = "vgg", weights: Optional[str] = None, random_trunk: bool = False) -> nn.Module:
    """LPIPS (Zhang et al. 2018) with frozen parameters; `random_trunk` is for tests only."""
    import lpips

    model = lpips.LPIPS(net=net, pretrained=True, pnet_rand=True, verbose=False)
    if not random_trunk:
        path = Path(weights) if weights else default_trunk_path(net)
        if not path.is_file():
            raise FileNotFoundError(
                f"LPIPS needs the torchvision {net} weights at {path} (file {TRUNK_FILES[net]}); "
                "copy it there or set distill.lpips_weights, or use distill.regression=mse")
        state = torch.load(path, map_location="cpu", weights_only=True)
        features = {k.split("features.", 1)[1]: v for k, v in state.items() if "features." in k}
        own = model.net.state_dict()
        mapped = {name: features[name.split(".", 1)[1]] for name in own}
        model.net.load_state_dict(mapped)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model

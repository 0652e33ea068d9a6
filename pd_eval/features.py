"""Feature extractors for FID: the standard Inception when its weights are here, a domain one offline.

Standard: clean-fid's TorchScript Inception-v3 (`inception-2015-12-05.pt`), read from
`$PD_INCEPTION_DIR` or clean-fid's own location (`/tmp`). Nothing is downloaded.

Offline fallback, `random-conv-v1`: a fixed, seeded, randomly initialised convolutional encoder
(resize to 64 px, four stride-2 conv + ReLU layers, global average pool, 128-d). Random conv
features are a known, weak but consistent image statistic: numbers computed with it are comparable
with each other, never with Inception FIDs. Every metric row records which extractor made it.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

FeatureExtractor = Callable[[torch.Tensor], torch.Tensor]  # (B, 3, 299, 299) float in [0, 255] -> (B, D)
INCEPTION_FILE = "inception-2015-12-05.pt"


class RandomConvFeatures(nn.Module):
    name = "random-conv-v1"

    def __init__(self, seed: int = 0, width: int = 32, dim: int = 128):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        chans = [3, width, width * 2, width * 4, dim]
        self.convs = nn.ModuleList(nn.Conv2d(a, b, 3, stride=2, padding=1) for a, b in zip(chans, chans[1:]))
        with torch.no_grad():
            for c in self.convs:
                c.weight.copy_(torch.randn(c.weight.shape, generator=g) * (2.0 / (c.in_channels * 9)) ** 0.5)
                c.bias.zero_()
        self.eval()

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x / 127.5 - 1, size=(64, 64), mode="bilinear", antialias=True)  # (B, 3, 64, 64)
        for c in self.convs:
            x = F.relu(c(x))
        return x.mean(dim=(2, 3))  # (B, dim)


def inception_path() -> Path | None:
    for folder in (os.environ.get("PD_INCEPTION_DIR"), tempfile.gettempdir(), "/tmp"):
        if folder and (Path(folder) / INCEPTION_FILE).is_file():
            return Path(folder) / INCEPTION_FILE
    return None


def load_extractor(prefer: str = "auto") -> tuple[str, FeatureExtractor]:
    """('inception-v3' | 'random-conv-v1', extractor). `prefer='inception'` fails if the file is absent."""
    path = inception_path()
    if prefer == "inception" and path is None:
        raise FileNotFoundError(f"FID needs {INCEPTION_FILE}: put it in $PD_INCEPTION_DIR or /tmp "
                                f"(clean-fid's location), or use eval.feature_extractor=auto for the offline one")
    if prefer in ("auto", "inception") and path is not None:
        from cleanfid.inception_torchscript import InceptionV3W

        model = InceptionV3W(str(path.parent), download=False, resize_inside=False).eval()
        return "inception-v3", lambda x: model(x)
    return RandomConvFeatures.name, RandomConvFeatures()

"""Annotator throughput: HED (controlnet-aux), DPT depth and UperNet seg (transformers), random weights.

The weights are written on the spot in the released layouts `pd_data.annotator_weights` reads
(`ControlNetHED.pth`, `dpt-hybrid-midas/`, `upernet-convnext-small/`) and loaded through
`pd_data.annotate.get_annotator`, as the annotate stage loads them; each annotator runs where it
runs there (CUDA when visible). Paper size: HED's one architecture, DPT-hybrid (ViT-B/16 on a BiT
stem, 384 px input) and UperNet on ConvNeXt-small (512 px input); tiny: the test suite's sizes.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from gpucheck.record import log

ANNOTATORS = (("hed", "controlnet_aux"), ("depth", "transformers"), ("seg", "transformers"))


def _dpt_config(tiny: bool):
    from transformers import BitConfig, DPTConfig

    if not tiny:  # dpt-hybrid-midas: BiT (3, 4, 9) stem, 768-d ViT, 384 px
        return DPTConfig(is_hybrid=True, image_size=384, neck_hidden_sizes=[256, 512, 768, 768],
                         reassemble_factors=[1, 1, 1, 0.5], backbone_featmap_shape=[1, 1024, 24, 24])
    bit = BitConfig(embedding_size=8, hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 1], num_groups=4,
                    layer_type="bottleneck", global_padding="same", embedding_dynamic_padding=True,
                    out_features=["stage1", "stage2", "stage3"])
    return DPTConfig(is_hybrid=True, backbone_config=bit, image_size=64, hidden_size=16, num_hidden_layers=4,
                     num_attention_heads=2, intermediate_size=32, backbone_out_indices=[0, 1, 2, 3],
                     neck_hidden_sizes=[8, 16, 16, 16], reassemble_factors=[1, 1, 1, 0.5], fusion_hidden_size=16,
                     backbone_featmap_shape=[1, 32, 4, 4])


def _upernet(tiny: bool):
    from transformers import ConvNextConfig, UperNetConfig, UperNetForSemanticSegmentation

    stages = ["stage1", "stage2", "stage3", "stage4"]
    if tiny:
        backbone = ConvNextConfig(hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 1, 1], out_features=stages)
        return UperNetForSemanticSegmentation(UperNetConfig(backbone_config=backbone, hidden_size=16,
                                                            auxiliary_in_channels=32, num_labels=150)), 64
    backbone = ConvNextConfig(hidden_sizes=[96, 192, 384, 768], depths=[3, 3, 27, 3], out_features=stages)
    return UperNetForSemanticSegmentation(UperNetConfig(backbone_config=backbone, hidden_size=512,
                                                        auxiliary_in_channels=384, num_labels=150)), 512


def write_weights(folder: Path, tiny: bool, seed: int = 0) -> Path:
    """A `data.annotator_weights` folder of random networks: HED, DPT-hybrid depth and UperNet seg."""
    from controlnet_aux.hed import ControlNetHED_Apache2
    from transformers import DPTForDepthEstimation, SegformerImageProcessor

    torch.manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(ControlNetHED_Apache2().state_dict(), folder / "ControlNetHED.pth")
    DPTForDepthEstimation(_dpt_config(tiny)).save_pretrained(folder / "dpt-hybrid-midas")
    seg, side = _upernet(tiny)
    seg.save_pretrained(folder / "upernet-convnext-small")
    SegformerImageProcessor(size={"height": side, "width": side}).save_pretrained(folder / "upernet-convnext-small")
    return folder


def _rate(annotator, images: list[np.ndarray]) -> float:
    """Images/s over `images` (outputs are uint8 arrays on the host, so the device's work is done)."""
    t0 = time.perf_counter()
    maps = annotator.batch(images) if hasattr(annotator, "batch") else [annotator(im, {}) for im in images]
    seconds = time.perf_counter() - t0
    assert len(maps) == len(images) and all(m.shape == im.shape and m.dtype == np.uint8 for m, im in zip(maps, images))
    return len(images) / seconds


def measure(weights: Path, sides: list[int], n_images: int, budget, record) -> dict:
    """Images/s of each annotator at each side (one warm-up batch at that side first)."""
    from pd_data.annotate import get_annotator

    rng = np.random.default_rng(0)
    rows = []
    for modality, backend in ANNOTATORS:
        t0 = time.perf_counter()
        a = get_annotator(backend, modality, weights)
        load_s = time.perf_counter() - t0
        for side in sides:
            what = f"annotator {modality} at {side} px"
            if budget.left() < 2:
                record.skip(what, f"{budget.left():.0f} s of the section left")
                continue
            images = [rng.integers(0, 256, (side, side, 3), dtype=np.uint8) for _ in range(n_images)]
            _rate(a, images[:min(2, n_images)])  # warm-up at this size
            log(what)
            rows.append({"annotator": modality, "backend": backend, "name": a.name, "side_px": side,
                         "images": n_images, "images_per_s": round(_rate(a, images), 2), "load_s": round(load_s, 2),
                         "device": str(getattr(a, "device", None) or _aux_device(a))})
    return {"weights": "random, in the released layouts", "rows": rows}


def _aux_device(annotator) -> str:
    """The device of a controlnet-aux detector's network (it keeps it as `netNetwork` or `model`)."""
    net = getattr(annotator.detector, "netNetwork", None) or getattr(annotator.detector, "model", None)
    return str(next(net.parameters()).device) if net is not None else "cpu"

"""Convert the original Prompt Diffusion checkpoint (CompVis-ldm ControlNet fork) to `PromptDiffusionControlNet`.

The released checkpoint (`network-step=04999.ckpt`, a PyTorch Lightning file written with
`save_weights_only=True`) holds the whole `ControlLDM`: Stable Diffusion 1.5 under
`model.diffusion_model.*` / `first_stage_model.*` / `cond_stage_model.*`, and the ControlNet under
`control_model.*`. Only `control_model.*` is converted here; the rest is SD 1.5 and is ignored.

Key mapping (`control_model.` + original name -> `PromptDiffusionControlNet` state-dict name);
`L` = `layers_per_block` (2 for SD), `b` = level, `l` = layer within the level:

    time_embed.0 / time_embed.2            -> time_embedding.linear_1 / time_embedding.linear_2
    input_blocks.0.0                       -> conv_in
    input_blocks.{1+b(L+1)+l}.0.*          -> down_blocks.{b}.resnets.{l}.*      (ResBlock, renamed below)
    input_blocks.{1+b(L+1)+l}.1.*          -> down_blocks.{b}.attentions.{l}.*   (SpatialTransformer, same names)
    input_blocks.{1+b(L+1)+L}.0.op         -> down_blocks.{b}.downsamplers.0.conv
    middle_block.0 / .1 / .2               -> mid_block.resnets.0 / mid_block.attentions.0 / mid_block.resnets.1
    input_hint_block.{0,2,4,...,12,14}     -> controlnet_cond_embedding.{conv_in, blocks.0..blocks.5, conv_out}
                                              (example pair, 6 channels)
    input_cond_block.{0,2,4,...,12,14}     -> controlnet_query_cond_embedding.{conv_in, blocks.0..blocks.5, conv_out}
                                              (query, 3 channels)
    zero_convs.{i}.0                       -> controlnet_down_blocks.{i}
    middle_block_out.0                     -> controlnet_mid_block

Inside a ResBlock: in_layers.0 -> norm1, in_layers.2 -> conv1, emb_layers.1 -> time_emb_proj,
out_layers.0 -> norm2, out_layers.3 -> conv2, skip_connection -> conv_shortcut. The hint blocks are
`nn.Sequential`s of 8 convolutions with SiLU at the odd indices (hence the even indices only).

Sources: the original model is `ControlNet` in Zhendong-Wang/Prompt-Diffusion `cldm/cldm.py`
(`input_hint_block` embeds the example pair, `input_cond_block` the query; their outputs are summed
and added after `input_blocks[0]`) with `models/cldm_v15.yaml` (`hint_channels: 6`); the diffusers
research port's converter (huggingface/diffusers
`examples/research_projects/promptdiffusion/convert_original_promptdiffusion_to_diffusers.py`,
`promptdiffusion=True` branch) maps `input_cond_block` to `controlnet_query_cond_embedding` exactly as
above. Everything except `input_cond_block` is stock ControlNet and is converted by diffusers' own
`diffusers.loaders.single_file_utils.convert_controlnet_checkpoint`; only the query block is mapped
here. The inverse (`diffusers_to_ldm`) is hand-written and checked by round trip against it.

The original training code feeds hints in [-1, 1] (`edit_dataset.py`: `2 * x / 255 - 1` for the
example pair and the query), so converted models get `hint_range="-1,1"`.
"""
from __future__ import annotations

import inspect
import json
import pickle
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from types import SimpleNamespace

import torch
from diffusers import UNet2DConditionModel
from diffusers.configuration_utils import FrozenDict
from diffusers.loaders.single_file_utils import (
    DIFFUSERS_TO_LDM_MAPPING,
    LDM_CONTROLNET_KEY,
    convert_controlnet_checkpoint,
)

from pd_model.controlnet import PromptDiffusionControlNet

SD_CONDITIONING_CHANNELS = (16, 32, 96, 256)  # the hint stack of the original (and of every SD ControlNet)
PAIR_BLOCK = "input_hint_block"  # original name of the example-pair hint encoder
QUERY_BLOCK = "input_cond_block"  # original name of the query hint encoder
PAIR_EMBEDDING = "controlnet_cond_embedding"
QUERY_EMBEDDING = "controlnet_query_cond_embedding"

_RESNET_TO_LDM = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0",
                  "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
_CONTROLNET_MAPS = DIFFUSERS_TO_LDM_MAPPING["controlnet"]


class CheckpointKeyError(ValueError):
    """The checkpoint's keys do not match the model: names what is missing and what is unexpected."""

    def __init__(self, what: str, missing=(), unexpected=(), mismatched=()):
        self.missing, self.unexpected, self.mismatched = sorted(missing), sorted(unexpected), sorted(mismatched)
        parts = [what]
        if self.missing:
            parts.append(f"missing keys ({len(self.missing)}): {', '.join(self.missing)}")
        if self.unexpected:
            parts.append(f"unexpected keys ({len(self.unexpected)}): {', '.join(self.unexpected)}")
        if self.mismatched:
            parts.append(f"shape mismatches ({len(self.mismatched)}): {', '.join(self.mismatched)}")
        super().__init__("; ".join(parts))


class UnsafeCheckpointError(ValueError):
    """A pickled checkpoint holds objects other than tensors and plain containers; it is not unpickled."""


# ---------------------------------------------------------------------------------------------- loading

def load_original_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a checkpoint's tensors: `.safetensors` with safetensors, `.ckpt`/`.pth`/`.pt`/`.bin` with
    `torch.load(weights_only=True)` (never arbitrary unpickling). A Lightning `state_dict` entry is unwrapped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint file at {path}")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors.torch import load_file
        obj = load_file(str(path), device="cpu")
    elif suffix in (".ckpt", ".pth", ".pt", ".bin"):
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise UnsafeCheckpointError(
                f"{path} holds pickled objects other than tensors and plain containers, and is not unpickled "
                f"(torch.load(weights_only=True) refused it: {str(e).splitlines()[0]}). Convert the file to "
                "safetensors in an environment you trust (load it there, keep its tensor state dict, "
                "safetensors.torch.save_file) and pass the .safetensors file instead.") from e
    else:
        raise ValueError(f"{path}: unsupported checkpoint format {suffix!r} (expected .safetensors, .ckpt or .pth)")
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path} holds a {type(obj).__name__}, not a state dict")
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"{path}: state dict entries that are not tensors: {', '.join(map(str, bad[:20]))}")
    return dict(obj)


# ---------------------------------------------------------------------------------------------- mapping

def _config(config) -> Mapping:
    return config.config if hasattr(config, "config") and not isinstance(config, Mapping) else config


def _hint_layout(config: Mapping) -> dict[str, int]:
    """diffusers conditioning-embedding module name -> index in the original nn.Sequential (SiLU at odd indices)."""
    n_blocks = 2 * (len(config["conditioning_embedding_out_channels"]) - 1)  # two convs per extra level
    layout = {"conv_in": 0, **{f"blocks.{j}": 2 + 2 * j for j in range(n_blocks)}}
    layout["conv_out"] = 2 + 2 * n_blocks
    return layout


def _fixed_map(config: Mapping) -> dict[str, str]:
    """Key-for-key renames taken from diffusers' own ControlNet table (diffusers key -> original key)."""
    out = dict(_CONTROLNET_MAPS["layers"])
    if config.get("class_embed_type") in ("timestep", "projection"):
        out.update(_CONTROLNET_MAPS["class_embed_type"])
    if config.get("addition_embed_type") == "text_time":
        out.update(_CONTROLNET_MAPS["addition_embed_type"])
    return out


def _resnet(part: str) -> str:
    return _RESNET_TO_LDM.get(part, part)


# diffusers key pattern -> its original name, given the match and the blocks per level (resnets + the
# downsampler): the down path's blocks are numbered in one sequence after the input conv.
_LDM_NAMES: tuple[tuple[str, Callable[[re.Match, int], str]], ...] = (
    (r"controlnet_down_blocks\.(\d+)\.(weight|bias)", lambda m, n: f"zero_convs.{m[1]}.0.{m[2]}"),
    (r"controlnet_mid_block\.(weight|bias)", lambda m, n: f"middle_block_out.0.{m[1]}"),
    (r"down_blocks\.(\d+)\.resnets\.(\d+)\.([^.]+)\.(.+)",
     lambda m, n: f"input_blocks.{1 + int(m[1]) * n + int(m[2])}.0.{_resnet(m[3])}.{m[4]}"),
    (r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", lambda m, n: f"input_blocks.{1 + int(m[1]) * n + int(m[2])}.1.{m[3]}"),
    (r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(weight|bias)",
     lambda m, n: f"input_blocks.{1 + int(m[1]) * n + n - 1}.0.op.{m[2]}"),
    (r"mid_block\.resnets\.(\d+)\.([^.]+)\.(.+)", lambda m, n: f"middle_block.{2 * int(m[1])}.{_resnet(m[2])}.{m[3]}"),
    (r"mid_block\.attentions\.0\.(.+)", lambda m, n: f"middle_block.1.{m[1]}"),
)


def diffusers_key_to_ldm(key: str, config) -> str:
    """The original (`control_model.`-less) name of one `PromptDiffusionControlNet` state-dict key."""
    config = _config(config)
    fixed = _fixed_map(config)
    if key in fixed:
        return fixed[key]
    per_level = config["layers_per_block"] + 1
    m = re.fullmatch(rf"({PAIR_EMBEDDING}|{QUERY_EMBEDDING})\.(conv_in|conv_out|blocks\.\d+)\.(weight|bias)", key)
    if m and m.group(2) in _hint_layout(config):
        block = PAIR_BLOCK if m.group(1) == PAIR_EMBEDDING else QUERY_BLOCK
        return f"{block}.{_hint_layout(config)[m.group(2)]}.{m.group(3)}"
    for pattern, name in _LDM_NAMES:
        if m := re.fullmatch(pattern, key):
            return name(m, per_level)
    raise KeyError(f"no original (ldm) name known for {key!r}")


def diffusers_to_ldm(state_dict: Mapping[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """`PromptDiffusionControlNet` state dict -> original `control_model.*` keys (the inverse of `ldm_to_diffusers`)."""
    config = _config(config)
    out, unknown = {}, []
    for key, value in state_dict.items():
        try:
            out[LDM_CONTROLNET_KEY + diffusers_key_to_ldm(key, config)] = value
        except KeyError:
            unknown.append(key)
    if unknown:
        raise CheckpointKeyError("diffusers keys with no original counterpart", unexpected=unknown)
    return out


class _ReadTracking(dict):
    """A dict that records which keys were read, to find checkpoint entries a converter never used."""

    def __init__(self, *args):
        super().__init__(*args)
        self.read: set[str] = set()

    def __getitem__(self, key):
        self.read.add(key)
        return super().__getitem__(key)

    def get(self, key, default=None):
        self.read.add(key)
        return super().get(key, default)


def ldm_to_diffusers(state_dict: Mapping[str, torch.Tensor], controlnet_config) -> dict[str, torch.Tensor]:
    """Original `control_model.*` keys -> `PromptDiffusionControlNet` keys; all other keys are ignored.

    Stock ControlNet parts go through diffusers' `convert_controlnet_checkpoint`; the query hint block
    (`input_cond_block`) is mapped here. Raises `CheckpointKeyError` naming any `control_model.*` key
    that was not used, or any original key the model needs that is absent.
    """
    config = _config(controlnet_config)
    if tuple(config["conditioning_embedding_out_channels"]) != SD_CONDITIONING_CHANNELS:
        # diffusers' converter hard-codes the SD hint stack (conv_out at input_hint_block.14)
        raise ValueError(f"the original ControlNet's hint stack is {SD_CONDITIONING_CHANNELS}, the config has "
                         f"{tuple(config['conditioning_embedding_out_channels'])}")
    control = {k[len(LDM_CONTROLNET_KEY):]: v for k, v in state_dict.items() if k.startswith(LDM_CONTROLNET_KEY)}
    if not control:
        raise CheckpointKeyError(f"no {LDM_CONTROLNET_KEY}* keys in the checkpoint (is it a Prompt Diffusion "
                                 "ControlLDM checkpoint?)")
    query = {k: v for k, v in control.items() if k.startswith(QUERY_BLOCK + ".")}
    stock = _ReadTracking({k: v for k, v in control.items() if k not in query})
    if "time_embed.0.weight" not in stock:  # diffusers' converter recognises a bare ControlNet dict by this key
        raise CheckpointKeyError("the checkpoint's ControlNet is incomplete",
                                 missing=[LDM_CONTROLNET_KEY + "time_embed.0.weight"])

    converted = convert_controlnet_checkpoint(stock, dict(config))
    # class / addition embeddings (absent from SD 1.5) are not handled by diffusers' ControlNet converter
    for new, old in _fixed_map(config).items():
        if new not in converted and old in stock:
            converted[new] = stock[old]

    missing = [k for k, v in converted.items() if v is None]  # diffusers' converter reads with .get()
    missing += [new for new in _fixed_map(config) if new not in converted]  # ... or skips absent fixed keys
    converted = {k: v for k, v in converted.items() if v is not None}
    for name in _hint_layout(config):
        for param in ("weight", "bias"):
            new = f"{QUERY_EMBEDDING}.{name}.{param}"
            old = diffusers_key_to_ldm(new, config)
            if old in query:
                converted[new] = query.pop(old)
            else:
                missing.append(new)
    unexpected = [k for k in stock if k not in stock.read] + list(query)
    if missing or unexpected:
        raise CheckpointKeyError(
            "the checkpoint's ControlNet does not match the model",
            missing=[LDM_CONTROLNET_KEY + _ldm_name_or_self(k, config) for k in missing],
            unexpected=[LDM_CONTROLNET_KEY + k for k in unexpected])
    return converted


def _ldm_name_or_self(key: str, config: Mapping) -> str:
    try:
        return diffusers_key_to_ldm(key, config)
    except KeyError:
        return key


# ---------------------------------------------------------------------------------------------- building

def _unet_config(unet_or_config) -> Mapping:
    """A UNet config from a UNet, a config mapping, a config.json, or a diffusers folder (its unet/)."""
    if isinstance(unet_or_config, UNet2DConditionModel):
        return unet_or_config.config
    if isinstance(unet_or_config, (str, Path)):
        path = Path(unet_or_config)
        for candidate in (path, path / "config.json", path / "unet" / "config.json"):
            if candidate.is_file():
                return json.loads(candidate.read_text())
        raise FileNotFoundError(f"no UNet config.json at {path} (nor {path}/config.json, {path}/unet/config.json)")
    if isinstance(unet_or_config, Mapping):
        return unet_or_config
    raise TypeError(f"expected a UNet2DConditionModel, a UNet config dict or a path, got {type(unet_or_config)}")


def build_controlnet(unet_or_config, hint_range: str = "-1,1") -> PromptDiffusionControlNet:
    """An untrained `PromptDiffusionControlNet` shaped like the original: the UNet's encoder, SD hint stack."""
    config = _unet_config(unet_or_config)
    if not isinstance(unet_or_config, UNet2DConditionModel):
        # `from_unet` only reads `unet.config` when it does not copy weights, so no UNet needs allocating
        defaults = {name: p.default for name, p in inspect.signature(UNet2DConditionModel.__init__).parameters.items()
                    if p.default is not inspect.Parameter.empty}
        config = FrozenDict({**defaults, **{k: v for k, v in config.items() if not k.startswith("_")}})
    return PromptDiffusionControlNet.from_unet(
        SimpleNamespace(config=config), conditioning_embedding_out_channels=SD_CONDITIONING_CHANNELS,
        hint_range=hint_range, load_weights_from_unet=False)


def convert_checkpoint(path: str | Path, unet_or_config, out_dir: str | Path | None = None,
                       hint_range: str = "-1,1") -> PromptDiffusionControlNet:
    """Load an original Prompt Diffusion checkpoint into a `PromptDiffusionControlNet`, strictly.

    `unet_or_config`: the SD UNet (or its config / config.json / diffusers folder) the ControlNet was
    trained against. `hint_range` stays "-1,1" for the original release (its training fed [-1, 1] hints).
    If `out_dir` is given the model is saved there with `save_pretrained`.
    """
    if hint_range not in ("-1,1", "0,1"):
        raise ValueError(f"hint_range must be '-1,1' or '0,1', got {hint_range!r}")
    state_dict = load_original_state_dict(path)
    model = build_controlnet(unet_or_config, hint_range=hint_range)
    converted = ldm_to_diffusers(state_dict, model.config)

    expected = model.state_dict()
    missing = expected.keys() - converted.keys()
    unexpected = converted.keys() - expected.keys()
    mismatched = [f"{LDM_CONTROLNET_KEY}{_ldm_name_or_self(k, model.config)} "
                  f"{tuple(converted[k].shape)} vs {tuple(expected[k].shape)}"
                  for k in expected.keys() & converted.keys() if converted[k].shape != expected[k].shape]
    if missing or unexpected or mismatched:
        name = lambda k: f"{LDM_CONTROLNET_KEY}{_ldm_name_or_self(k, model.config)} ({k})"  # noqa: E731
        raise CheckpointKeyError(f"{path} does not fit the model built from the given UNet config",
                                 missing=map(name, missing), unexpected=map(name, unexpected), mismatched=mismatched)
    model.load_state_dict(converted, strict=True)
    model.eval()
    if out_dir is not None:
        model.save_pretrained(out_dir)
    return model

"""The original Prompt Diffusion (Zhendong-Wang/Prompt-Diffusion) as `scripts/bench_peer.py` runs it:
imported from a local checkout at run time, never copied; its models built from its own
`models/cldm_v15.yaml` at a smaller size, and its training step as its code takes one.

Only the Lightning wrapper's modules (`ldm.models.diffusion.ddpm` / `ddim`) are replaced by empty
stand-ins, and `omegaconf.listconfig.ListConfig` when omegaconf is absent.
"""
from __future__ import annotations

import importlib
import subprocess
import sys
import types
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

CLONE_URL = "https://github.com/Zhendong-Wang/Prompt-Diffusion"
ENV_VAR = "PD_ORIGINAL_REPO"
PIP_NAMES = {"einops": "einops", "PIL": "pillow", "yaml": "pyyaml", "torchvision": "torchvision", "numpy": "numpy"}


class Skip(Exception):
    """No usable original checkout: the benchmark is skipped (exit 0)."""


class MissingPackage(RuntimeError):
    """The original's code imports a package this environment lacks."""


def original_root(path: str | None) -> Path:
    """The checkout to import from; raises Skip saying what is missing and how to get it."""
    how = f"get it with `git clone {CLONE_URL} <dir>` and pass --original <dir> (or set {ENV_VAR}=<dir>)"
    if not path:
        raise Skip(f"bench_peer: skipped: no original Prompt Diffusion checkout given (--original / {ENV_VAR}); {how}")
    root = Path(path).expanduser().resolve()
    if not (root / "cldm" / "cldm.py").is_file():
        what = "does not exist" if not root.exists() else "has no cldm/cldm.py"
        raise Skip(f"bench_peer: skipped: the original Prompt Diffusion checkout {root} {what}; {how}")
    return root


def _stub(name: str, **attrs) -> None:
    module = types.ModuleType(name)
    module.__dict__.update(attrs, __doc__=f"bench_peer stand-in for {name} (not used by the benchmarked modules)")
    sys.modules[name] = module


def import_original(root: Path) -> types.SimpleNamespace:
    """The original's modules, imported from `root`: cldm.cldm and ldm.modules.diffusionmodules.util."""
    for name in ("einops", "torchvision", "PIL", "yaml"):  # third-party imports of the modules used
        try:
            importlib.import_module(name)
        except ModuleNotFoundError:
            pip = PIP_NAMES.get(name, name)
            raise MissingPackage(f"the original code at {root} needs the package {pip!r}, which this environment "
                                 f"({sys.executable}) lacks: install it with `{sys.executable} -m pip install {pip}`")
    # ControlLDM's base class and sampler (pytorch_lightning, omegaconf, the VAE, ...): not what is timed
    _stub("ldm.models.diffusion.ddpm", LatentDiffusion=torch.nn.Module)
    _stub("ldm.models.diffusion.ddim", DDIMSampler=None)
    try:
        importlib.import_module("omegaconf.listconfig")
    except ModuleNotFoundError:  # ControlNet / UNetModel only compare type(context_dim) with it
        _stub("omegaconf")
        _stub("omegaconf.listconfig", ListConfig=type("ListConfig", (list,), {}))
    # its gradient checkpointing calls torch.cuda.amp.autocast, deprecated since torch 2.4 (harmless here)
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"ldm\.modules\.diffusionmodules\.util")
    sys.path.insert(0, str(root))
    try:
        cldm = importlib.import_module("cldm.cldm")
        util = importlib.import_module("ldm.modules.diffusionmodules.util")
    except ModuleNotFoundError as e:
        if e.name and (e.name.split(".")[0] in ("cldm", "ldm")):
            raise Skip(f"bench_peer: skipped: {root} is not a complete Prompt Diffusion checkout ({e}); "
                       f"get one with `git clone {CLONE_URL}`") from e
        pip = PIP_NAMES.get(e.name.split(".")[0], e.name.split(".")[0]) if e.name else "?"
        raise MissingPackage(f"importing the original's cldm.cldm from {root} needs {e.name!r}, which this environment "
                             f"({sys.executable}) lacks: `{sys.executable} -m pip install {pip}`") from e
    finally:
        sys.path.remove(str(root))
    return types.SimpleNamespace(cldm=cldm, util=util, root=root, commit=_commit(root))


def _commit(root: Path) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def small_config(root: Path, channels: tuple[int, ...], layers: int, text_dim: int, checkpointing: bool) -> dict:
    """The original's models/cldm_v15.yaml with the ControlNet's and the UNet's sizes scaled down."""
    import yaml

    cfg = yaml.safe_load((root / "models" / "cldm_v15.yaml").read_text())
    base = channels[0]
    if any(c % base for c in channels):
        raise ValueError(f"--channels {channels}: every width must be a multiple of the first ({base}), "
                         "as ldm's channel_mult is")
    small = {"model_channels": base, "channel_mult": [c // base for c in channels], "num_res_blocks": layers,
             "attention_resolutions": [2 ** i for i in range(len(channels) - 2, len(channels))],  # lower two levels
             "num_heads": 8, "context_dim": text_dim, "use_checkpoint": checkpointing}
    for key in ("control_stage_config", "unet_config"):
        cfg["model"]["params"][key]["params"].update(small)
    return cfg


def _randomise_zeros(model: torch.nn.Module, seed: int) -> None:
    """Fill the all-zero tensors (zero convolutions, zero-initialised output projections, norm biases)
    with small random values, so every path of the network carries signal in the agreement check."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def build_original(orig, cfg: dict, seed: int):
    """(ControlNet, ControlledUnetModel) of the original at `cfg`, random weights from `seed`."""
    params = cfg["model"]["params"]
    torch.manual_seed(seed)
    control = orig.cldm.ControlNet(**params["control_stage_config"]["params"])
    unet = orig.cldm.ControlledUnetModel(**params["unet_config"]["params"])
    _randomise_zeros(control, seed + 1)
    _randomise_zeros(unet, seed + 2)
    return control, unet


def apply_model(orig, control, unet, x, t, d: dict) -> torch.Tensor:
    """The original's ControlLDM.apply_model, called on the two networks (no Lightning module around them)."""
    shim = types.SimpleNamespace(model=types.SimpleNamespace(diffusion_model=unet), control_model=control,
                                 control_scales=[1.0] * 13, only_mid_control=False)
    cond = {"c_crossattn": [d["context"]], "example_pair": [d["pair"]], "query": [d["query"]]}
    return orig.cldm.ControlLDM.apply_model(shim, x, t, cond)


class OriginalStep:
    """One fp32 training step of the original: q_sample (its SD beta schedule), apply_model, MSE to the
    noise, backward, AdamW over the ControlNet's parameters."""

    def __init__(self, orig, control, unet, d: dict, unet_requires_grad: bool = False):
        self.orig, self.control, self.unet, self.d = orig, control.train(), unet.train(), d
        unet.requires_grad_(unet_requires_grad)  # sd_locked=True keeps it out of the optimizer either way
        control.requires_grad_(True)
        self.opt = torch.optim.AdamW(control.parameters(), lr=1e-4)  # ControlLDM.configure_optimizers
        betas = torch.as_tensor(orig.util.make_beta_schedule("linear", 1000, linear_start=0.00085, linear_end=0.0120))
        ac = torch.cumprod(1 - betas, 0).float()
        self.a, self.s = ac.sqrt(), (1 - ac).sqrt()
        self.n = d["x0"].shape[0]

    def __call__(self) -> float:
        d, ex = self.d, self.orig.util.extract_into_tensor
        self.opt.zero_grad(set_to_none=True)
        x = ex(self.a, d["t"], d["x0"].shape) * d["x0"] + ex(self.s, d["t"], d["x0"].shape) * d["noise"]
        loss = F.mse_loss(apply_model(self.orig, self.control, self.unet, x, d["t"], d), d["noise"])
        loss.backward()
        self.opt.step()
        return loss.item()

    def close(self) -> None:
        pass

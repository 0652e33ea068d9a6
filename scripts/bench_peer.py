"""Peer benchmark: our ControlNet training step against the original Prompt Diffusion's, same model, same weights.

    .venv/bin/python scripts/bench_peer.py --original /path/to/Prompt-Diffusion          # batch 8 and 16, 1 thread
    .venv/bin/python scripts/bench_peer.py --original ... --batch 8 --repeats 3 --steps 2 --as-trained
    PD_ORIGINAL_REPO=/path/to/Prompt-Diffusion .venv/bin/python scripts/bench_peer.py --check-only

The original is Zhendong-Wang/Prompt-Diffusion (a CompVis-ldm / ControlNet-1.0 fork). Its code is
imported from the checkout at run time, never copied here: `cldm.cldm.ControlNet` (with
`input_hint_block` for the 6-channel example pair and `input_cond_block` for the 3-channel query),
`cldm.cldm.ControlledUnetModel`, `ControlLDM.apply_model` (how the two are wired) and the beta
schedule of `ldm.modules.diffusionmodules.util`. Only the Lightning wrapper's modules
(`ldm.models.diffusion.ddpm` / `ddim`, which import pytorch_lightning) are replaced by empty
stand-ins, and `omegaconf.listconfig.ListConfig` (an isinstance check in the constructors) when
omegaconf is absent. Without a checkout the script says how to get one and exits 0 (skipped).

Both models are built from the original's own `models/cldm_v15.yaml` with the sizes scaled down
(--channels, --layers; attention at the two lower-resolution levels, 8 heads, 32-d text of 24
tokens, 4 x 16 x 16 latents, 128 px hints and SD's 8x hint stack (16, 32, 96, 256)): ours is
`diffusers.UNet2DConditionModel` with the config diffusers derives from that yaml
(`create_unet_diffusers_config_from_ldm`) and `PromptDiffusionControlNet.from_unet`. The original's
random initialisation (its zero convolutions filled with random values, so the ControlNet's
residuals are not zero) is loaded into ours through `convert_ldm_unet_checkpoint` (the UNet) and
`pd_model.convert.ldm_to_diffusers` (the ControlNet); the forward outputs of both must then agree
(max abs difference, fp32) before anything is timed.

What one step is:
- original: `ControlLDM.apply_model` (ControlNet, then ControlledUnetModel with the residuals), MSE to
  the noise (`LatentDiffusion.p_losses` with its defaults: logvar 0, no ELBO term), backward, AdamW
  (lr 1e-4) over the ControlNet's parameters, fp32 (`precision=32` in its train.py). By default the
  UNet is frozen and gradient checkpointing is off: the same work as ours. `--as-trained` adds a row
  for the original as its config and code really train: `use_checkpoint: True` (cldm_v15.yaml) and
  the UNet's weights left requiring gradients (sd_locked only keeps them out of the optimizer, so
  backward still computes the decoder's weight gradients).
- ours: `scripts/bench_train.py`'s `Step`, i.e. the pipeline's `pd_model.loop.Optimiser.step`
  (zero_grad, autocast, `pd_model.objective.prediction_loss` with eps prediction, backward, grad-norm
  clipping, AdamW) over the ControlNet, UNet frozen, laid out by `pd_model.precision.fast_layout`;
  at `mixed_precision="no"` (fp32, the same arithmetic) and `"bf16"` (our fast path: bf16 autocast, fused AdamW,
  channels_last weights, fp32 attention and GroupNorm on the CPU).

Every (implementation, batch) configuration gets its own copy of the models and optimizer, is warmed
up, then timed in rounds that alternate between configurations (--repeats rounds of --steps steps);
a step time is the median over all its timed steps, on --threads intra-op threads (default 1). FLOPs
of one step (forward + backward) come from torch.utils.flop_counter, counted with the math SDPA
backend so our attention matmuls count as the original's einsums do (the CPU flash kernels have no
formula). Prints one JSON object: agreement, parameter counts, FLOPs, per-configuration step time
median, samples/s, and our/original samples/s ratios (fp32 and bf16) at each batch.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import sys
from pathlib import Path

import torch

if not __package__:  # run as a file: import from the repository root, as `python -m scripts.NAME` does
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scripts.harness import dumps, emit, interleave, machine, stopwatch, summary
from scripts.peer_original import (
    CLONE_URL,
    ENV_VAR,
    MissingPackage,
    OriginalStep,
    Skip,
    apply_model,
    build_original,
    import_original,
    original_root,
    small_config,
)

HINT_STACK = (16, 32, 96, 256)  # SD's (and the original's) hint encoder: 8x down


# ---------------------------------------------------------------------------------------------- the models

@dataclasses.dataclass
class Models:
    """The original's ControlNet and ControlledUnetModel and ours, built with the same weights."""

    control: torch.nn.Module
    unet_ldm: torch.nn.Module
    unet: torch.nn.Module  # UNet2DConditionModel
    net: torch.nn.Module  # PromptDiffusionControlNet


def build_ours(cfg: dict, control, unet_ldm, latent: int):
    """(UNet2DConditionModel, PromptDiffusionControlNet) with the original's weights, through the converters."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (
        LDM_UNET_KEY,
        convert_ldm_unet_checkpoint,
        create_unet_diffusers_config_from_ldm,
    )

    from pd_model.controlnet import PromptDiffusionControlNet
    from pd_model.convert import LDM_CONTROLNET_KEY, ldm_to_diffusers

    unet_sd = {LDM_UNET_KEY + k: v for k, v in unet_ldm.state_dict().items()}
    ucfg = create_unet_diffusers_config_from_ldm(cfg, unet_sd)  # sample_size from SD (64): set below
    ucfg["sample_size"] = latent
    unet = UNet2DConditionModel(**ucfg)
    unet.load_state_dict(convert_ldm_unet_checkpoint(unet_sd, unet.config), strict=True)
    net = PromptDiffusionControlNet.from_unet(unet, conditioning_embedding_out_channels=HINT_STACK)
    cn_sd = {LDM_CONTROLNET_KEY + k: v for k, v in control.state_dict().items()}
    net.load_state_dict(ldm_to_diffusers(cn_sd, net.config), strict=True)
    return unet, net


# ---------------------------------------------------------------------------------------------- data and steps

def synthetic(batch: int, latent: int, hint: int, text: tuple[int, int], seed: int = 1) -> dict:
    """Fixed random inputs: latents, noise, timesteps, text, example pair and query in [-1, 1]."""
    g = torch.Generator().manual_seed(seed)
    return {"x0": torch.randn(batch, 4, latent, latent, generator=g),
            "noise": torch.randn(batch, 4, latent, latent, generator=g),
            "t": torch.randint(0, 1000, (batch,), generator=g),
            "context": torch.randn(batch, *text, generator=g),
            "pair": torch.rand(batch, 6, hint, hint, generator=g) * 2 - 1,
            "query": torch.rand(batch, 3, hint, hint, generator=g) * 2 - 1}


def our_step(unet, controlnet, batch: int, latent: int, hint: int, text: tuple[int, int], precision: str):
    """bench_train's Step (the pipeline's optimizer step) over our ControlNet, UNet frozen, eps prediction."""
    from diffusers import DDPMScheduler

    from pd_model.base import BaseModel
    from scripts.bench_train import Step

    unet.requires_grad_(False)
    controlnet.requires_grad_(True)
    base = BaseModel(unet, None, None, DDPMScheduler(num_train_timesteps=1000))
    return Step(base, controlnet, [controlnet], batch, latent, text, hint, precision, "cpu", snr_gamma=0.0)


# ---------------------------------------------------------------------------------------------- checks

@torch.no_grad()
def agreement(orig, control, unet_ldm, unet, net, d: dict) -> dict:
    """Max abs differences of the ControlNet residuals and of the final noise prediction, fp32, eval mode."""
    from pd_model.controlnet import residuals

    for m in (control, unet_ldm, unet, net):
        m.eval()
    x, t = d["x0"], d["t"]
    res_orig = control(x=x, timesteps=t, example_pair=d["pair"], query=d["query"], context=d["context"])
    eps_orig = apply_model(orig, control, unet_ldm, x, t, d)
    extra = residuals(net, x, t, d["context"], d["pair"], d["query"])
    res_ours = [*extra["down_block_additional_residuals"], extra["mid_block_additional_residual"]]
    eps_ours = unet(x, t, d["context"], **extra).sample
    if len(res_orig) != len(res_ours):
        raise AssertionError(f"the original ControlNet gives {len(res_orig)} residuals, ours {len(res_ours)}")
    return {"batch": x.shape[0], "controlnet_residuals_max_abs_diff": max((a - b).abs().max().item()
                                                                           for a, b in zip(res_orig, res_ours)),
            "noise_prediction_max_abs_diff": (eps_orig - eps_ours).abs().max().item(),
            "noise_prediction_max_abs": eps_orig.abs().max().item()}


def count_flops(step) -> int:
    """FLOPs of one training step (forward + backward), attention through the math SDPA backend."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


def n_params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


# ---------------------------------------------------------------------------------------------- main

def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--original", default=os.environ.get(ENV_VAR),
                    help=f"local checkout of {CLONE_URL} (default: ${ENV_VAR}); absent: skipped, exit 0")
    ap.add_argument("--batch", type=int, nargs="+", default=[8, 16])
    ap.add_argument("--steps", type=int, default=2, help="timed steps per configuration per round")
    ap.add_argument("--repeats", type=int, default=5, help="alternating rounds")
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (intra-op threads)")
    ap.add_argument("--channels", type=int, nargs="+", default=[32, 64, 64], help="UNet widths per level")
    ap.add_argument("--layers", type=int, default=2, help="layers_per_block / num_res_blocks")
    ap.add_argument("--latent", type=int, default=16, help="latent side (4 channels); hints are 8x that")
    ap.add_argument("--text", type=int, nargs=2, default=[24, 32], metavar=("TOKENS", "DIM"))
    ap.add_argument("--as-trained", action="store_true",
                    help="also time the original with gradient checkpointing and the UNet requiring grad, as it trains")
    ap.add_argument("--check-batch", type=int, default=2, help="batch of the forward agreement check")
    ap.add_argument("--atol", type=float, default=1e-4, help="largest allowed forward difference (fp32)")
    ap.add_argument("--check-only", action="store_true", help="only the agreement check and the parameter counts")
    ap.add_argument("--no-flops", action="store_true", help="skip the FLOP counts (one extra step per configuration)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    for name in ("steps", "repeats", "threads", "layers", "latent", "check_batch"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if min(args.batch) < 1:
        ap.error(f"--batch values must be >= 1, got {args.batch}")
    if len(args.channels) < 2:
        ap.error(f"--channels needs at least two levels (attention is at the lower two), got {args.channels}")
    return args


def describe(args: argparse.Namespace, orig, m: Models, check: dict) -> dict:
    """The result's head: the machine, the original checkout, the model sizes, parameter counts, the agreement."""
    return {
        "machine": machine(),
        "original": {"path": str(orig.root), "commit": orig.commit},
        "model": {"channels": args.channels, "layers_per_block": args.layers, "latent": [4, args.latent, args.latent],
                  "hint_px": args.latent * 8, "hint_stack": list(HINT_STACK), "text": list(args.text),
                  "down_blocks": list(m.unet.config.down_block_types), "heads": m.unet.config.attention_head_dim},
        "params": {"original": {"controlnet": n_params(m.control), "unet": n_params(m.unet_ldm)},
                   "ours": {"controlnet": n_params(m.net), "unet": n_params(m.unet)}},
        "agreement": check,
    }


def build_steps(args: argparse.Namespace, orig, m: Models, impls: list[str]) -> tuple[dict, dict, dict]:
    """(step, FLOPs of one step, seconds of the first step) per (implementation, batch), each step on its
    own copy of the models and optimizer."""
    text, hint = tuple(args.text), args.latent * 8
    ckpt_cfg = small_config(orig.root, tuple(args.channels), args.layers, text[1], checkpointing=True)
    steps, flops, first = {}, {}, {}
    for b in args.batch:
        d = synthetic(b, args.latent, hint, text)
        for impl in impls:
            if impl == "original":
                steps[impl, b] = OriginalStep(orig, copy.deepcopy(m.control), copy.deepcopy(m.unet_ldm), d)
            elif impl == "original_as_trained":  # same weights, in models built with use_checkpoint=True
                c2, u2 = build_original(orig, ckpt_cfg, args.seed)
                c2.load_state_dict(m.control.state_dict())
                u2.load_state_dict(m.unet_ldm.state_dict())
                steps[impl, b] = OriginalStep(orig, c2, u2, d, unet_requires_grad=True)
            else:
                steps[impl, b] = our_step(copy.deepcopy(m.unet), copy.deepcopy(m.net), b, args.latent, hint, text,
                                          "no" if impl == "ours_fp32" else "bf16")
            with stopwatch() as lap:
                steps[impl, b]()
            first[impl, b] = lap.seconds
            if not args.no_flops:
                flops[impl, b] = count_flops(steps[impl, b])
    return steps, flops, first


def timing(args: argparse.Namespace, impls: list[str], times: dict, flops: dict, first: dict) -> dict:
    """The result's timing part: one row per (implementation, batch), our/original samples/s ratios."""
    rows = []
    for (impl, b), ts in times.items():
        t = summary(ts)
        med = t["median"]
        row = {"impl": impl, "batch": b, "step_s_median": round(med, 4), "step_s_min_max": [round(t["min"], 4), round(t["max"], 4)],
               "samples_per_s": round(b / med, 2), "timed_steps": t["n"], "first_step_s": round(first[impl, b], 2)}
        if (impl, b) in flops:
            row |= {"gflop_per_step": round(flops[impl, b] / 1e9, 3), "achieved_gflop_s": round(flops[impl, b] / med / 1e9, 2)}
        rows.append(row)
    by = {(r["impl"], r["batch"]): r for r in rows}
    ratios = {}
    for b in args.batch:
        ref = [i for i in impls if i.startswith("original")]
        ratios[f"batch_{b}"] = {f"{ours.removeprefix('ours_')}_vs_{o}": round(by[ours, b]["samples_per_s"] / by[o, b]["samples_per_s"], 2)
                                for o in ref for ours in ("ours_fp32", "ours_bf16")}
    return {"timing": {"batches": args.batch, "repeats": args.repeats, "steps_per_round": args.steps,
                       "statistic": "median step time over all timed steps, configurations in rotated order per round"},
            "rows": rows, "ratios_ours_over_original_samples_per_s": ratios,
            "goal_2x_bf16_met": all(ratios[f"batch_{b}"]["bf16_vs_original"] >= 2 for b in args.batch)}


def run(args: argparse.Namespace) -> dict:
    root = original_root(args.original)
    orig = import_original(root)
    torch.set_num_threads(args.threads)
    text, hint = tuple(args.text), args.latent * 8
    cfg = small_config(root, tuple(args.channels), args.layers, text[1], checkpointing=False)
    control, unet_ldm = build_original(orig, cfg, args.seed)
    m = Models(control, unet_ldm, *build_ours(cfg, control, unet_ldm, args.latent))
    check = agreement(orig, control, unet_ldm, m.unet, m.net, synthetic(args.check_batch, args.latent, hint, text))
    result = describe(args, orig, m, check)
    if check["noise_prediction_max_abs_diff"] > args.atol or check["controlnet_residuals_max_abs_diff"] > args.atol:
        raise AssertionError(f"the two models disagree beyond --atol {args.atol}: {dumps(check, indent=None)}; the "
                             "comparison would not be of the same network (check the config mapping and converters)")
    if args.check_only:
        return result

    impls = ["original", *(["original_as_trained"] if args.as_trained else []), "ours_fp32", "ours_bf16"]
    steps, flops, first = build_steps(args, orig, m, impls)
    times = interleave(steps, args.repeats, warmup=1, per_round=args.steps)
    for s in steps.values():
        s.close()
    return result | timing(args, impls, times, flops, first)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        result = run(args)
    except Skip as e:
        print(e)
        return 0
    except MissingPackage as e:
        print(f"bench_peer: {e}", file=sys.stderr)
        return 2
    emit(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())

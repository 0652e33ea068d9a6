"""Training-step throughput of the joint Prompt Diffusion ControlNet: samples/s, FLOPs, fraction of peak.

    .venv/bin/python scripts/bench_train.py                      # demo configuration, this CPU, fp32
    .venv/bin/python scripts/bench_train.py --paper-size --device cuda --batch 8     # 256 px, bf16
    .venv/bin/python scripts/bench_train.py --paper-size --steps 1 --batch 1        # does it run on this CPU?

`--paper-size` builds a Stable-Diffusion-1.5-sized UNet (320, 640, 1280, 1280; 768-d text) with a
4-channel latent input at resolution/8, at random initialisation (no weights needed), plus the
Prompt Diffusion ControlNet with SD's 8x hint stack; it defaults to 256 px (32x32 latents), a 77x768
text context and bf16 autocast (--fp32 to turn that off). Step time is the median of --steps after
two warm-up steps; peak memory is torch.cuda.max_memory_allocated on a GPU, the process's peak RSS
on a CPU. FLOPs of one step (forward + backward) are
counted with torch.utils.flop_counter; the peak is a measured dense matmul rate on the same device
and dtype, so the fraction is "of what this machine's matmul actually reaches", not a datasheet.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode


def matmul_peak(device: str, dtype: torch.dtype, n: int = 2048, reps: int = 10) -> float:
    """Median FLOP/s of an n x n matmul on this device and dtype."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    times = []
    for _ in range(reps + 2):
        _sync(device)
        t0 = time.perf_counter()
        a @ b
        _sync(device)
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(times[2:])


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def build(args):
    from diffusers import DDPMScheduler, UNet2DConditionModel

    from pd_model.base import BaseModel
    from pd_model.controlnet import PromptDiffusionControlNet

    if args.paper_size:
        unet = UNet2DConditionModel(sample_size=args.resolution // 8, cross_attention_dim=768)  # SD 1.5 defaults
        hint_stack, in_res, text = (16, 32, 96, 256), args.resolution // 8, (77, 768)
    else:
        unet = UNet2DConditionModel(
            sample_size=args.resolution, in_channels=3, out_channels=3, block_out_channels=(32, 64, 64),
            layers_per_block=1, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
            attention_head_dim=8, norm_num_groups=8)
        hint_stack, in_res, text = (16,), args.resolution, (24, 32)
    controlnet = PromptDiffusionControlNet.from_unet(unet, conditioning_embedding_out_channels=hint_stack)
    unet.requires_grad_(False)
    if args.grad_checkpointing:
        controlnet.enable_gradient_checkpointing()
    sched = DDPMScheduler(num_train_timesteps=1000)
    return BaseModel(unet, None, None, sched), controlnet, in_res, text


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--resolution", type=int, default=None, help="pixels (default 32; 256 with --paper-size)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast for the forward pass")
    ap.add_argument("--paper-size", action="store_true", help="SD-1.5-sized UNet + ControlNet, 256 px, bf16")
    ap.add_argument("--fp32", action="store_true", help="with --paper-size: no bf16 autocast")
    ap.add_argument("--grad-checkpointing", action="store_true")
    args = ap.parse_args()
    if args.resolution is None:
        args.resolution = 256 if args.paper_size else 32
    if args.paper_size and not args.fp32:
        args.bf16 = True
    base, controlnet, in_res, (t_len, t_dim) = build(args)
    dev = args.device
    base.unet.to(dev)
    controlnet.to(dev).train()
    opt = torch.optim.AdamW(controlnet.parameters(), lr=1e-4)
    b, c = args.batch, base.unet.config.in_channels
    g = torch.Generator(device="cpu").manual_seed(0)
    x0 = torch.randn(b, c, in_res, in_res, generator=g).to(dev)
    pair = torch.randn(b, 6, args.resolution, args.resolution, generator=g).to(dev)
    query = torch.randn(b, 3, args.resolution, args.resolution, generator=g).to(dev)
    emb = torch.randn(b, t_len, t_dim, generator=g).to(dev)

    def step() -> None:
        t = torch.randint(0, 1000, (b,), generator=g).to(dev)
        noise = torch.randn(x0.shape, generator=g).to(dev)
        xt = base.scheduler.add_noise(x0, noise, t)
        with torch.autocast(device_type=dev.split(":")[0], dtype=torch.bfloat16, enabled=args.bf16):
            down, mid = controlnet(xt, t, emb, controlnet_cond=pair, controlnet_query_cond=query, return_dict=False)
            pred = base.unet(xt, t, emb, down_block_additional_residuals=down, mid_block_additional_residual=mid).sample
        loss = torch.nn.functional.mse_loss(pred.float(), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    with FlopCounterMode(display=False) as counter:
        step()
    flops = counter.get_total_flops()
    for _ in range(2):  # warm-up
        step()
    times = []
    if dev.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    for _ in range(args.steps):
        _sync(dev)
        t0 = time.perf_counter()
        step()
        _sync(dev)
        times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    peak = matmul_peak(dev, torch.bfloat16 if args.bf16 else torch.float32)
    result = {
        "device": torch.cuda.get_device_name() if dev.startswith("cuda") else f"cpu ({torch.get_num_threads()} threads)",
        "config": vars(args),
        "trainable_params_M": round(sum(p.numel() for p in controlnet.parameters()) / 1e6, 2),
        "step_s_median": round(step_s, 4), "step_s_p10_p90": [round(float(np.percentile(times, q)), 4) for q in (10, 90)],
        "samples_per_s": round(b / step_s, 2),
        "gflop_per_step": round(flops / 1e9, 2),
        "achieved_gflop_s": round(flops / step_s / 1e9, 1),
        "matmul_peak_gflop_s": round(peak / 1e9, 1),
        "fraction_of_matmul_peak": round(flops / step_s / peak, 3),
    }
    if dev.startswith("cuda"):
        result["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    else:  # ru_maxrss is KiB on Linux: the whole process, weights and optimizer state included
        import resource

        result["peak_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

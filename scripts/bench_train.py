"""Training-step throughput of the joint Prompt Diffusion ControlNet: samples/s, FLOPs, fraction of peak.

    .venv/bin/python scripts/bench_train.py                          # demo configuration, this CPU: fp32 vs bf16
    .venv/bin/python scripts/bench_train.py --precision no bf16 --batch 8 16 --repeats 4
    .venv/bin/python scripts/bench_train.py --paper-size --device cuda --batch 8 32 --compile   # 256 px, bf16
    .venv/bin/python scripts/bench_train.py --paper-size --steps 1 --batch 1 --precision no    # does it run here?
    .venv/bin/python scripts/bench_train.py --threads 1 && .venv/bin/python scripts/bench_train.py --processes 2
                                                     # data-parallel scaling: 1 process x 1 thread vs 2 x 1 (gloo, DDP)

Each step is the pipeline's own: `pd_model.loop.Optimiser.step` (accelerate's autocast and fp16 gradient scaler,
clipping, AdamW) over `pd_model.objective.prediction_loss` (noising, ControlNet residuals, UNet,
min-SNR-weighted loss), with the weights laid out by `pd_model.precision.fast_layout` as the train
stage lays them out; only the data is synthetic (fixed random tensors, no loader). The demo
configuration is the demo profile's: pixel-space UNet (32, 64, 64) at 32 px with v-prediction,
min-SNR 5, the ControlNet and the UNet decoder trained. `--paper-size` builds a
Stable-Diffusion-1.5-sized UNet (320, 640, 1280, 1280; 768-d text, 4-channel latents at
resolution/8) at random initialisation (no weights needed) with the ControlNet trained and the UNet
frozen, as the paper profile trains.

`--processes N` relaunches this script under torchrun on N local processes of one thread each (gloo
on the CPU, NCCL with one GPU each on CUDA): each computes its 1/N share of the global --batch and
gradients are summed through the pipeline's DistributedDataParallel path (`pd_model.loop.Optimiser`, DDP through accelerate:
bucketed all-reduce overlapping backward); rank 0 prints, samples/s counting the global batch.

Every (precision, batch) configuration is built once, warmed up, then timed in rounds that
alternate between configurations (--repeats rounds of --steps steps); the step time is the median
over all its timed steps. FLOPs of one step (forward + backward) are counted with
torch.utils.flop_counter (the CPU's flash-attention kernels have no formula there: attention counts
as zero on the CPU); the peak is a measured dense matmul rate on the same device and dtype, so the
fraction is "of what this machine's matmul reaches", not a datasheet. Peak memory is
torch.cuda.max_memory_allocated on a GPU, the process's peak RSS on a CPU (all configurations).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

if not __package__:  # run as a file: import from the repository root, as `python -m scripts.NAME` does
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scripts.harness import device_sync, emit, interleave, machine, matmul_flops, median, peak_rss_mb, stopwatch


def build_models(paper_size: bool, resolution: int):
    """(base, controlnet, trained modules, latent side, (text length, text width)) at random init."""
    from diffusers import DDPMScheduler, UNet2DConditionModel

    from pd_model.base import BaseModel
    from pd_model.controlnet import PromptDiffusionControlNet

    torch.manual_seed(0)
    if paper_size:
        unet = UNet2DConditionModel(sample_size=resolution // 8, cross_attention_dim=768)  # SD 1.5 defaults
        hint_stack, in_res, text = (16, 32, 96, 256), resolution // 8, (77, 768)
        sched = DDPMScheduler(num_train_timesteps=1000)
    else:  # the demo profile's base (pd_model.base.build_tiny_base at base.block_out_channels=(32, 64, 64))
        unet = UNet2DConditionModel(
            sample_size=resolution, in_channels=3, out_channels=3, block_out_channels=(32, 64, 64),
            layers_per_block=1, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
            attention_head_dim=8, norm_num_groups=8)
        hint_stack, in_res, text = (16,), resolution, (24, 32)
        sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction")
    controlnet = PromptDiffusionControlNet.from_unet(unet, conditioning_embedding_out_channels=hint_stack)
    unet.requires_grad_(False)
    trained = [controlnet] if paper_size else [controlnet, unet.up_blocks, unet.conv_norm_out, unet.conv_out]
    for m in trained:
        m.requires_grad_(True)
    return BaseModel(unet, None, None, sched), controlnet, trained, in_res, text


class Step:
    """One training step of the pipeline's loop on fixed synthetic data; `__call__` runs one."""

    def __init__(self, base, controlnet, trained, batch: int, in_res: int, text: tuple[int, int], resolution: int,
                 mixed_precision: str, device: str, snr_gamma: float = 5.0, compile_: bool = False):
        from pd_model.loop import Optim, Optimiser, accelerator, world
        from pd_model.objective import Batch
        from pd_model.precision import fast_layout, resolve

        self.base, self.controlnet, dev = base, controlnet, torch.device(device)
        base.unet.to(dev)
        controlnet.to(dev).train()
        self.precision, self.dev = resolve(mixed_precision, dev), dev
        self._layout = ExitStack()  # the train stage's weight layout, undone by `close`
        self._layout.enter_context(fast_layout([controlnet, base.unet], self.precision, dev))
        params = [p for m in trained for p in m.parameters()]
        self.opt = Optimiser(accelerator(dev, self.precision), params,
                             Optim(10**9, batch, 1e-5, weight_decay=1e-2, mixed_precision=self.precision), self._loss)
        batch //= world()[1]  # this process's share of the global batch
        g = torch.Generator().manual_seed(1 + world()[0])
        c = base.unet.config.in_channels
        self.x0 = torch.randn(batch, c, in_res, in_res, generator=g).to(dev)
        self.batch = Batch(torch.zeros(batch, 3, resolution, resolution), [""] * batch,
                           torch.rand(batch, 6, resolution, resolution, generator=g).to(dev) * 2 - 1,
                           torch.rand(batch, 3, resolution, resolution, generator=g).to(dev) * 2 - 1)
        self.emb = torch.randn(batch, *text, generator=g).to(dev)
        self.noise = torch.randn(self.x0.shape, generator=g).to(dev)
        self.t = torch.randint(0, 1000, (batch,), generator=g).to(dev)
        self.snr_gamma, self.device, self.n = snr_gamma, device, batch
        if compile_:
            self.controlnet.forward = torch.compile(self.controlnet.forward)
            self.base.unet.forward = torch.compile(self.base.unet.forward)

    def _loss(self, step, idx):
        from pd_model.objective import prediction_loss

        return prediction_loss(self.base, self.x0, self.noise, self.t, self.emb, self.batch, self.controlnet, self.snr_gamma)

    def __call__(self) -> float:
        from accelerate.state import AcceleratorState

        from pd_model.loop import accelerator

        # accelerate keeps one precision per process and autocasts by it: when the steps of another
        # precision ran last, this step's is made the process's again (its prepared optimizer stays).
        if AcceleratorState().mixed_precision != self.precision:
            accelerator(self.dev, self.precision)
        return self.opt.step(0, [range(self.n)]).loss

    @property
    def computes_in(self) -> torch.dtype:
        return {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[self.precision]

    def close(self) -> None:
        self._layout.close()


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, nargs="+", default=[16])
    ap.add_argument("--resolution", type=int, default=None, help="pixels (default 32; 256 with --paper-size)")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per round")
    ap.add_argument("--repeats", type=int, default=4, help="alternating rounds")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", nargs="+", default=None, choices=["no", "bf16", "fp16", "auto"],
                    help="train.mixed_precision values to compare (default: no bf16; bf16 with --paper-size)")
    ap.add_argument("--paper-size", action="store_true", help="SD-1.5-sized UNet + ControlNet, 256 px")
    ap.add_argument("--compile", action="store_true", help="also time each configuration under torch.compile")
    ap.add_argument("--no-flops", action="store_true", help="skip the FLOP count (one extra step per configuration)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads of this process (default: torch's)")
    ap.add_argument("--processes", type=int, default=1, help="data-parallel processes (torchrun), one thread each")
    return ap.parse_args()


def relaunch(processes: int) -> int:
    """This command again under torchrun on `processes` local processes of one thread each; its exit status."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
           __file__, *sys.argv[1:]]
    return subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}).returncode


def set_up_process(args: argparse.Namespace) -> None:
    """Threads of this process; under torchrun, also join the process group (gloo, or NCCL on one GPU
    per process) with one thread unless --threads says otherwise."""
    if "LOCAL_RANK" in os.environ:
        import torch.distributed as dist

        cuda = args.device.startswith("cuda")
        dist.init_process_group("nccl" if cuda else "gloo")
        if cuda:
            args.device = f"cuda:{os.environ['LOCAL_RANK']}"
        torch.set_num_threads(args.threads or 1)
        if args.batch[0] % args.processes:
            raise SystemExit(f"--batch {args.batch} must divide by --processes {args.processes}")
    elif args.threads:
        torch.set_num_threads(args.threads)


def build_steps(args: argparse.Namespace, configs: list[tuple[str, int, bool]]) -> tuple[dict, dict, dict]:
    """(Step, FLOPs of one step, seconds of the first step) per (precision, batch, compile): each built
    on fresh models, its first step (and compilation) timed, its FLOPs counted, then warmed up."""
    dev = args.device
    steps, flops, first = {}, {}, {}
    for key in configs:
        p, b, c = key
        base, cn, trained, in_res, text = build_models(args.paper_size, args.resolution)
        steps[key] = Step(base, cn, trained, b, in_res, text, args.resolution, p, dev, compile_=c)
        with stopwatch(device_sync(dev)) as lap:
            steps[key]()  # first step (and compilation)
        first[key] = lap.seconds
        if not args.no_flops and not c:
            with FlopCounterMode(display=False) as counter:
                steps[key]()
            flops[key] = counter.get_total_flops()
        steps[key]()
        if dev.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
    return steps, flops, first


def step_rows(configs: list[tuple[str, int, bool]], steps: dict, times: dict, flops: dict, first: dict, peaks: dict,
              reference: str) -> list[dict]:
    """One row per configuration: median step time, samples/s, FLOPs and the fraction of the matmul
    peak, and the speed-up over the `reference` precision at the same batch and compile setting."""
    rows = []
    for key in configs:
        p, b, c = key
        s, ts = steps[key], times[key]
        step_s = median(ts)
        peak = peaks[s.computes_in]
        row = {"precision": p, "computes_in": str(s.computes_in), "batch": b,
               "compile": c, "step_s_median": round(step_s, 4),
               "step_s_p10_p90": [round(float(np.percentile(ts, q)), 4) for q in (10, 90)],
               "samples_per_s": round(b / step_s, 2), "first_step_s": round(first[key], 2)}
        if key in flops:
            row |= {"gflop_per_step": round(flops[key] / 1e9, 2), "achieved_gflop_s": round(flops[key] / step_s / 1e9, 1),
                    "matmul_peak_gflop_s": round(peak / 1e9, 1), "fraction_of_matmul_peak": round(flops[key] / step_s / peak, 3)}
        rows.append(row)
    base_rows = {(r["batch"], r["compile"]): r for r in rows if r["precision"] == reference}
    for r in rows:
        ref = base_rows[(r["batch"], r["compile"])]
        r[f"speedup_vs_{reference}"] = round(ref["step_s_median"] / r["step_s_median"], 2)
    return rows


def summarise(args: argparse.Namespace, steps: dict, rows: list[dict]) -> dict:
    """The printed result: the device, the command line's settings, the rows, trainable parameters,
    peak memory, processes and the machine."""
    dev = args.device
    result = {"device": torch.cuda.get_device_name() if dev.startswith("cuda") else f"cpu ({torch.get_num_threads()} threads)",
              "config": vars(args), "rows": rows,
              "trainable_params_M": round(sum(p.numel() for p in next(iter(steps.values())).opt.params) / 1e6, 2)}
    if dev.startswith("cuda"):
        result["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    else:  # the whole process, weights and optimizer state included
        result["peak_rss_gib"] = round(peak_rss_mb() / 1024, 2)
    return result | {"processes": args.processes, "machine": machine()}


def main() -> int:
    args = parse_args()
    if args.processes > 1 and "LOCAL_RANK" not in os.environ:  # relaunch under torchrun
        return relaunch(args.processes)
    set_up_process(args)
    if args.resolution is None:
        args.resolution = 256 if args.paper_size else 32
    precisions = args.precision or (["bf16"] if args.paper_size else ["no", "bf16"])
    dev = args.device
    configs = [(p, b, c) for p in precisions for b in args.batch for c in ([False, True] if args.compile else [False])]
    steps, flops, first = build_steps(args, configs)
    times = interleave(steps, args.repeats, warmup=0, per_round=args.steps, sync=device_sync(dev))  # warmed up above
    peaks = {d: matmul_flops(dev, d) for d in {torch.float32} | {s.computes_in for s in steps.values()}}
    result = summarise(args, steps, step_rows(configs, steps, times, flops, first, peaks, precisions[0]))
    if os.environ.get("RANK", "0") == "0":
        emit(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""How a training step computes: fp32, or bf16 / fp16 autocast with what must stay fp32 kept there.

`resolve` turns a `mixed_precision` setting into accelerate's (`"no"`, `"bf16"`, `"fp16"`), which
the loop hands to its `Accelerator` (autocast, and fp16's gradient scaler: `pd_model.loop`). fp32
(`"no"`) is the reference: it runs exactly as it always has and reproduces bitwise. Under autocast:

- convolutions and matmuls run in the low precision: on a CPU with AMX, oneDNN's bf16 kernels
  (this machine: the demo step's convolutions forward and backward took 145 against 27 ms in fp32
  vs bf16); the loss and the optimizer stay fp32 (`pd_model.objective`, `pd_model.loop`);
- the UNet and ControlNet weights are channels_last (NHWC), oneDNN's and cuDNN's native layout for
  low-precision convolutions, so activations stay NHWC through the network instead of being
  reordered around every convolution;
- on the CPU, attention runs in fp32: torch's CPU flash-attention backward is several times slower
  in bf16 than in fp32 at small head sizes (demo, head size 8: 187 against 34 ms per step), so a
  bf16 step with bf16 attention was slower than fp32 (0.41 against 0.33 s); GroupNorm (and the SiLU
  after it) runs in fp32 too, being several times slower on bf16 NHWC tensors than on fp32 ones.

`fast_layout` applies the last two for the duration of a training and puts everything back
(contiguous weights, the original attention processors) before the models are saved or evaluated.
Measured on this machine by `scripts/bench_train.py` (docs/benchmarks.md, "Training step").
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Literal

import torch

from pd_model.config import MixedPrecision

Precision = Literal["no", "bf16", "fp16"]  # accelerate's `mixed_precision`


def resolve(setting: MixedPrecision, device: torch.device, key: str = "train.mixed_precision") -> Precision:
    """What a setting means on `device`, as accelerate's `mixed_precision`.

    auto: bf16 on a CUDA device that has it, fp16 (with a gradient scaler) on one that does not, fp32
    on the CPU (so a CPU run's weights do not depend on which CPU it ran on; ask for bf16 explicitly).
    fp16 needs CUDA: accelerate runs fp16 autocast and its gradient scaler on GPUs only, and would
    train a CPU run in fp32 under the fp16 name."""
    cuda = device.type == "cuda"
    if setting == "auto":
        return "no" if not cuda else ("bf16" if torch.cuda.is_bf16_supported() else "fp16")
    if setting == "bf16" and cuda and not torch.cuda.is_bf16_supported():
        raise ValueError(f"{key}='bf16' but {torch.cuda.get_device_name(device)} has no bf16; "
                         f"set {key}=fp16 (autocast with a gradient scaler) or auto")
    if setting == "fp16" and not cuda:
        raise ValueError(f"{key}='fp16' needs a CUDA device (fp16 autocast and its gradient scaler run on GPUs only) "
                         f"but this training runs on the {device.type}; set {key}=bf16 or no (fp32)")
    return setting


def describe(precision: Precision) -> str:
    return {"no": "fp32", "bf16": "bfloat16", "fp16": "float16"}[precision]


class Fp32Attention:
    """An attention processor that runs another one (diffusers' default SDPA processor) with autocast
    off and its inputs in fp32: attention in fp32 inside a bf16 network."""

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, *args, **kwargs):
        if encoder_hidden_states is not None:
            encoder_hidden_states = encoder_hidden_states.float()
        with torch.autocast(hidden_states.device.type, enabled=False):
            return self.inner(attn, hidden_states.float(), encoder_hidden_states, *args, **kwargs)


def _fp32_input(_module, args):
    return (args[0].float(), *args[1:])


@contextmanager
def fast_layout(models: list[torch.nn.Module], precision: Precision, device: torch.device) -> Iterator[None]:
    """channels_last weights, and fp32 attention and GroupNorm on the CPU, for a training in mixed
    `precision` on `device`; fp32 ("no") changes nothing. On exit the weights are contiguous again,
    the hooks are gone and the attention processors the models had are back, so saving and inference
    see the models as they were."""
    if precision == "no":
        yield
        return
    cpu = device.type == "cpu"
    processors = [m.attn_processors if hasattr(m, "set_attn_processor") else None for m in models]
    hooks = []
    for m, procs in zip(models, processors):
        m.to(memory_format=torch.channels_last)
        if procs is not None and cpu:
            m.set_attn_processor({name: Fp32Attention(p) for name, p in procs.items()})
        if cpu:  # GroupNorm on bf16 NHWC tensors is several times slower than on fp32 ones here
            hooks += [g.register_forward_pre_hook(_fp32_input) for g in m.modules() if isinstance(g, torch.nn.GroupNorm)]
    try:
        yield
    finally:
        for h in hooks:
            h.remove()
        for m, procs in zip(models, processors):
            m.to(memory_format=torch.contiguous_format)
            if procs is not None and cpu:
                m.set_attn_processor(procs)

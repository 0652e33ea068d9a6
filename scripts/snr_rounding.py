"""How far diffusers' `compute_snr` is from the hand-written SNR ratio the loss used before, on the demo
base's scheduler (docs/results.md, "Training noise").

    .venv/bin/python scripts/snr_rounding.py
"""
import argparse

import torch
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_snr


def main() -> None:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    for prediction in ("v_prediction", "epsilon"):
        s = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", clip_sample=True,
                          prediction_type=prediction)
        t = torch.arange(1000)
        ab = s.alphas_cumprod[t]
        old, new = ab / (1 - ab), compute_snr(s, t)
        below = 1 if prediction == "v_prediction" else 0
        w_old, w_new = torch.clamp(old, max=5.0) / (old + below), torch.clamp(new, max=5.0) / (new + below)
        rel = ((w_old - w_new).abs() / w_old).max()
        print(f"{prediction}: min-SNR-5 weights differ on {int((w_old != w_new).sum())} of 1000 timesteps, "
              f"at most {float(rel):.2g} relative")


if __name__ == "__main__":
    main()

"""Engine experiment: do neighbouring slices help Noise2Void on a serial-section stack (2.5D input)?

Noise in one section is independent of the noise in the next, while the structure carries on
through them. So the section above and below may be given to the network at full value: only
the centre slice's pixels need the blind spot. This is the idea of DeepInterpolation (Lecoq et
al. 2021), which predicts a frame from the frames around it. Whether it pays depends on how
alike adjacent slices are. ISBI's sections measure 11.8 on ``plan.anisotropy``: a pixel's
neighbour slice is as alike as a pixel 11.8 px away in-plane.

For each context radius r, the script trains the engine's 2D denoising network (the CPU plan's
widths, patch, batch, blind spot and lr schedule) for the same number of seconds. The input is
2r + 1 channels: the slice and r slices on either side, mirrored at the stack's ends. Flips,
90° turns and the reversal of slice order are drawn per patch. It then predicts all 30 slices,
applies the engine's posterior step, and scores both against the clean stack. The noisy stack
is the one ``denoise_quality.py`` uses (sigma 25, seed 2012). Prints a table and writes JSON.

    python bench/denoise_context.py [--radii 0 1] [--seconds 240] [--out bench/results/denoise_context.json]
"""

from __future__ import annotations

import argparse
import math
import pathlib
import sys
import time

import numpy as np
import torch

from dlorch.core.engine.denoise.blindspot import blindspot_batch, masked_mse
from dlorch.core.engine.denoise.plan import BLINDSPOT_CELL, BLINDSPOT_RADIUS, DEFAULTS
from dlorch.core.engine.denoise.posterior import estimate_noise_var, posterior_mean
from dlorch.core.engine.module import lr_factor
from dlorch.core.engine.network import build_unet
from denoise_quality import DATA, HERE, noisy_copy, psnr, save


def slab_indices(z: int, depth: int, radius: int) -> list[int]:
    """Slices ``z - radius .. z + radius`` of a stack ``depth`` deep, mirrored at its ends."""
    out = []
    for k in range(z - radius, z + radius + 1):
        k = -k if k < 0 else k
        out.append(2 * (depth - 1) - k if k >= depth else k)
    return out


def train_and_score(noisy: np.ndarray, clean: np.ndarray, radius: int, seconds: float, seed: int = 0) -> dict:
    """Train Noise2Void with ``radius`` context slices per side for ``seconds``; PSNRs of the result."""
    torch.manual_seed(seed)
    d = DEFAULTS["cpu"]
    mean, std = float(noisy.mean()), float(noisy.std())
    x = (noisy - mean) / std
    depth, height, width = x.shape
    net = build_unet(2, 2 * radius + 1, 1, d.filters, "batch").to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(net.parameters(), lr=d.lr, weight_decay=1e-4)
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed + 1)
    p = d.patch
    t0, steps = time.perf_counter(), 0
    while (share := (time.perf_counter() - t0) / seconds) < 1:
        for group in opt.param_groups:
            group["lr"] = d.lr * lr_factor(share, 0.03, 0.02)
        patches = []
        for _ in range(d.batch):
            z, y0, x0 = rng.integers(0, depth), rng.integers(0, height - p + 1), rng.integers(0, width - p + 1)
            a = x[slab_indices(z, depth, radius), y0 : y0 + p, x0 : x0 + p]
            a = a[..., ::-1] if rng.integers(0, 2) else a
            a = np.rot90(a, rng.integers(0, 4), axes=(-2, -1))
            patches.append(np.ascontiguousarray(a[::-1] if rng.integers(0, 2) else a))
        batch = torch.from_numpy(np.stack(patches))
        centre = batch[:, radius : radius + 1]
        masked, weight = blindspot_batch(centre, BLINDSPOT_CELL, BLINDSPOT_RADIUS, gen)
        inputs = torch.cat([batch[:, :radius], masked, batch[:, radius + 1 :]], 1)
        loss = masked_mse(net(inputs.contiguous(memory_format=torch.channels_last)), centre, weight)
        opt.zero_grad()
        loss.backward()
        opt.step()
        steps += 1
    train_s = time.perf_counter() - t0
    net.eval()
    with torch.inference_mode():
        mu = np.stack([
            net(torch.from_numpy(np.ascontiguousarray(x[slab_indices(z, depth, radius)]))[None]
                .contiguous(memory_format=torch.channels_last))[0, 0].numpy()
            for z in range(depth)
        ])
    noise_var = estimate_noise_var(x, mu)
    denoised = posterior_mean(x, mu, noise_var) * std + mean
    return {
        "context_radius": radius,
        "input_slices": 2 * radius + 1,
        "steps": steps,
        "train_seconds": train_s,
        "psnr_noisy": psnr(noisy, clean),
        "psnr_network_only": psnr(mu * std + mean, clean),
        "psnr_denoised": psnr(denoised, clean),
        "noise_std_estimate": math.sqrt(noise_var) * std,
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--radii", type=int, nargs="+", default=[0, 1], help="context slices per side, one run each")
    ap.add_argument("--seconds", type=float, default=240.0, help="training seconds per run (default 240)")
    ap.add_argument("--data", type=pathlib.Path, default=DATA)
    ap.add_argument("--out", type=pathlib.Path, default=HERE / "results" / "denoise_context.json")
    args = ap.parse_args(argv)
    clean = np.load(args.data)["image"].astype(np.float32)
    noisy = noisy_copy(clean)
    rows = []
    for r in args.radii:
        rows.append(train_and_score(noisy, clean, r, args.seconds))
        print(f"radius {r} done: {rows[-1]['psnr_denoised']:.2f} dB", flush=True)
    print(f"\nISBI 2012, sigma 25, Noise2Void, {args.seconds:.0f} s of training each, {torch.get_num_threads()} threads")
    print(f"{'input slices':>12}  {'steps':>6}  {'network dB':>10}  {'+posterior dB':>13}  {'gain dB':>7}")
    for r in rows:
        print(f"{r['input_slices']:>12}  {r['steps']:>6}  {r['psnr_network_only']:>10.2f}  {r['psnr_denoised']:>13.2f}"
              f"  {r['psnr_denoised'] - r['psnr_noisy']:>+7.2f}")
    return save({"seconds": args.seconds, "runs": rows}, args.out)


if __name__ == "__main__":
    main(sys.argv[1:])

"""Denoising quality benchmark: Noise2Void on ISBI 2012 EM with synthetic Gaussian noise, automatic plan.

Adds Gaussian noise (sigma 25 on the 0-255 scale, fixed seed, not clipped) to the 30 ISBI
training slices, trains Noise2Void on the noisy stack alone within a time budget, denoises
the stack and scores it against the clean images: PSNR (data range 255) of the noisy input
and of the result, the gain, and the seconds spent. Prints a table and writes JSON.

``--supervised`` trains CARE with the clean stack as target instead: a reference for what the
same network and budget reach when told the answer, i.e. how far self-supervision is from it.

    python bench/denoise_quality.py [--time-budget SECONDS] [--supervised] [--out bench/results/denoise_quality.json]

Other scripts can call ``run(time_budget)`` and get the report dict.
"""

from __future__ import annotations

import argparse
import json
import logging
import pathlib
import platform
import sys
import tempfile
import time

import numpy as np

from dlorch.core.engine.denoise import NoHooks, Progress, plan_denoising, train_denoising
from dlorch.core.engine.denoise.predict import denoise_with_details
from dlorch.core.engine.device import detect_runtime

DATA = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "isbi2012-em" / "isbi2012_train.npz"
HERE = pathlib.Path(__file__).resolve().parent
SIGMA = 25.0
NOISE_SEED = 2012
DATA_RANGE = 255.0


class PrintingHooks(NoHooks):
    """Prints one line per checkpoint so a long run shows its progress."""

    def on_checkpoint(self, path: pathlib.Path, progress: Progress) -> None:
        m = progress.metrics
        print(
            f"  epoch {progress.epochs_done:3d}/{progress.epochs_total}"
            f"  train_loss {m.get('train_loss', float('nan')):.4f}"
            f"  val_loss {m.get('val_loss', float('nan')):.4f}  lr {m.get('lr', float('nan')):.2e}"
            f"  t {m.get('train_seconds', 0):6.1f}s",
            flush=True,
        )


def psnr(estimate: np.ndarray, clean: np.ndarray, data_range: float = DATA_RANGE) -> float:
    """Peak signal-to-noise ratio in dB over the whole array."""
    mse = float(np.mean((np.asarray(estimate, np.float64) - np.asarray(clean, np.float64)) ** 2))
    return float(10 * np.log10(data_range**2 / mse)) if mse > 0 else float("inf")


def noisy_copy(clean: np.ndarray, sigma: float = SIGMA, seed: int = NOISE_SEED) -> np.ndarray:
    """The clean stack as float32 plus Gaussian noise; not clipped, so the noise stays Gaussian."""
    rng = np.random.default_rng(seed)
    return clean.astype(np.float32) + rng.normal(0.0, sigma, clean.shape).astype(np.float32)


def run(time_budget: float = 600.0, data: pathlib.Path = DATA, verbose: bool = True, supervised: bool = False) -> dict:
    """Train Noise2Void on the noisy ISBI stack within ``time_budget`` seconds and score the result.

    Args:
        time_budget: cap on training seconds given to ``plan_denoising``.
        data: the ISBI 2012 ``.npz`` with an ``image`` array (Z, Y, X) uint8.
        verbose: print the plan and one line per epoch.
        supervised: train CARE with the clean stack as target instead: not a way to denoise
            (the clean image is what is scored), a reference for what the same network and
            budget reach when they are told the answer.

    Returns:
        The report: PSNRs, gain, seconds, epochs and the plan.
    """
    logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)
    clean = np.load(data)["image"].astype(np.float32)
    noisy = noisy_copy(clean)

    t_start = time.perf_counter()
    target = clean if supervised else None
    plan = plan_denoising(noisy, target, time_budget=time_budget, mode="care" if supervised else None)
    plan_s = time.perf_counter() - t_start
    if verbose:
        print("plan:", *plan.reasons, sep="\n  ", flush=True)
    with tempfile.TemporaryDirectory() as workdir:
        t0 = time.perf_counter()
        hooks = PrintingHooks() if verbose else NoHooks()
        result = train_denoising(noisy, target, plan, workdir=pathlib.Path(workdir), resume_from=None, hooks=hooks)
        train_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        # The public predict_denoising returns details.image; the details add the network's
        # own output (plain Noise2Void) and the noise level the posterior step estimated.
        details = denoise_with_details(result.checkpoint, noisy)
        predict_s = time.perf_counter() - t0
    denoised = details.image

    held_out = plan.val_slices
    report = {
        "psnr_noisy": psnr(noisy, clean),
        "psnr_denoised": psnr(denoised, clean),
        "psnr_denoised_held_out_slices": psnr(denoised[held_out], clean[held_out]) if held_out else None,
        "psnr_network_only": psnr(details.network_output, clean),
        "noise_std_estimate": details.noise_std,
        "sigma": SIGMA,
        "plan_seconds": plan_s,
        "train_seconds": train_s,
        "predict_seconds": predict_s,
        "epochs_done": result.epochs_done,
        "epochs_planned": plan.epochs,
        "steps_per_epoch": plan.steps_per_epoch,
        "stopped_by": result.stopped_by,
        "best_epoch": result.metrics.get("best_epoch"),
        "best_val_loss": result.metrics.get("best_val_loss"),
        "time_budget_s": plan.time_budget_s,
        "device": detect_runtime().accelerator,
        "machine": f"{platform.processor() or platform.machine()}, {detect_runtime().cpu_threads} threads",
        "mode": plan.mode,
        "plan": plan.model_dump(mode="json"),
    }
    report["gain_db"] = report["psnr_denoised"] - report["psnr_noisy"]
    report["train_samples_per_s"] = result.epochs_done * plan.steps_per_epoch * plan.batch_size / train_s
    report["predict_mvox_per_s"] = noisy.size / 1e6 / predict_s
    return report


def print_table(report: dict) -> None:
    """The report's headline numbers as an aligned two-column table."""
    rows = [
        ("PSNR noisy vs clean", f"{report['psnr_noisy']:.2f} dB"),
        ("PSNR denoised vs clean", f"{report['psnr_denoised']:.2f} dB"),
        ("gain", f"{report['gain_db']:+.2f} dB"),
    ]
    if report.get("mode", "n2v") == "n2v":
        rows += [
            ("  network only (plain N2V)", f"{report['psnr_network_only']:.2f} dB"),
            ("  noise std estimate", f"{report['noise_std_estimate'] or float('nan'):.2f}  (true {report['sigma']:g})"),
        ]
    rows += [
        ("train seconds", f"{report['train_seconds']:.1f}  ({report['epochs_done']}/{report['epochs_planned']} epochs "
         f"of {report['steps_per_epoch']} steps, stopped by {report['stopped_by']})"),
        ("predict seconds", f"{report['predict_seconds']:.1f}"),
        ("plan seconds", f"{report['plan_seconds']:.1f}"),
    ]
    if report.get("psnr_denoised_held_out_slices") is not None:
        rows.insert(2, ("  on held-out slices", f"{report['psnr_denoised_held_out_slices']:.2f} dB"))
    width = max(len(k) for k, _ in rows)
    how = "CARE with the clean stack as target (reference)" if report.get("mode") == "care" else "Noise2Void"
    print(f"\nISBI 2012 (30 x 512 x 512), Gaussian noise sigma {report['sigma']:g}, {how}, automatic plan")
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--time-budget", type=float, default=600.0, help="cap on training seconds (default 600)")
    ap.add_argument("--data", type=pathlib.Path, default=DATA)
    ap.add_argument("--supervised", action="store_true",
                    help="reference: train CARE with the clean stack as target instead of Noise2Void")
    ap.add_argument("--out", type=pathlib.Path, default=HERE / "results" / "denoise_quality.json")
    args = ap.parse_args(argv)
    report = run(args.time_budget, args.data, supervised=args.supervised)
    print_table(report)
    return save(report, args.out)


def save(report: dict, out: pathlib.Path) -> dict:
    """Write ``report`` as JSON to ``out`` and say so; returns it."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")
    return report


if __name__ == "__main__":
    main(sys.argv[1:])

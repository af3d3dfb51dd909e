"""Classical reference for the denoising benchmark: BM3D on the same noisy ISBI stack.

BM3D (Dabov et al. 2007; Mäkinen et al. 2020, PyPI ``bm3d``) is the classical denoiser the
published anchors compare against (BSD68, sigma 25: BM3D ~28.6 dB, Noise2Void 27.71 dB). Here it
gets the same noisy copy of the 30 ISBI slices as ``denoise_quality.py`` (sigma 25, fixed seed,
float, not clipped) and is told the true sigma, which the self-supervised engine has to estimate.
Slice by slice, one core. Prints a table and writes JSON. Needs ``pip install bm3d`` (a benchmark
reference only; dlorch does not depend on it).

    python bench/bm3d_reference.py [--slices N] [--out bench/results/bm3d_reference.json]
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import denoise_quality  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=pathlib.Path, default=denoise_quality.DATA)
    ap.add_argument("--slices", type=int, default=30, help="first N slices (default all 30)")
    ap.add_argument("--out", type=pathlib.Path, default=HERE / "results" / "bm3d_reference.json")
    args = ap.parse_args(argv)
    try:
        import bm3d
    except ImportError:
        sys.exit("error: bm3d is not installed; run `pip install bm3d` (a benchmark reference only)")
    clean = np.load(args.data)["image"]
    noisy = denoise_quality.noisy_copy(clean)[: args.slices]
    clean = clean[: args.slices]
    t0 = time.perf_counter()
    out = np.stack([bm3d.bm3d(s.astype(np.float64), sigma_psd=denoise_quality.SIGMA).astype(np.float32) for s in noisy])
    seconds = time.perf_counter() - t0
    per_slice = [denoise_quality.psnr(o, c) for o, c in zip(out, clean)]
    report = {"method": "bm3d (true sigma)", "slices": len(out), "sigma": denoise_quality.SIGMA,
              "psnr_noisy": denoise_quality.psnr(noisy, clean), "psnr_denoised": denoise_quality.psnr(out, clean),
              "psnr_per_slice": per_slice, "seconds": seconds}
    report["gain_db"] = report["psnr_denoised"] - report["psnr_noisy"]
    print(f"\nISBI 2012 ({len(out)} x 512 x 512), Gaussian noise sigma {report['sigma']:g}, BM3D told the true sigma")
    for k, v in [("PSNR noisy vs clean", f"{report['psnr_noisy']:.2f} dB"),
                 ("PSNR BM3D vs clean", f"{report['psnr_denoised']:.2f} dB"),
                 ("gain", f"{report['gain_db']:+.2f} dB"),
                 ("per slice", f"{min(per_slice):.2f} - {max(per_slice):.2f} dB"),
                 ("seconds (one core)", f"{seconds:.0f}")]:
        print(f"  {k:<22} {v}")
    return denoise_quality.save(report, args.out)


if __name__ == "__main__":
    main(sys.argv[1:])

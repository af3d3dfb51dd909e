"""`dlorch denoise` against its classical peers on the same noisy inputs: PSNR, SSIM and seconds; prints a table, writes JSON.

Images: scikit-image's grayscale photographs (colour ones converted to gray) and ISBI 2012 EM
slices, all as floats on a 0-255 scale. Noise (float, unclipped, a fixed seed per image and case):
Gaussian sigma 15, 25, 50, and a Poisson-Gaussian case ("pg": Poisson with 30 photons at white,
plus Gaussian sigma 5 on the 0-255 scale). Every method sees the same noisy arrays.

Methods:
    nlm        scikit-image non-local means, h = 0.8 sigma, sigma from ``estimate_sigma`` (its docs' recipe)
    wavelet    scikit-image wavelet denoising, BayesShrink, soft, sigma from ``estimate_sigma``
    bm3d-true  BM3D (PyPI ``bm3d``) told the true noise sigma (for "pg": the noise's overall std)
    bm3d-est   BM3D with the sigma ``estimate_sigma`` gives
    dlorch-Ns  `dlorch denoise IMAGE --time-budget N` (Noise2Void from the noisy image alone, blended
               with the engine's own collaborative filtering by SURE at a noise level it estimates;
               the embedded default, so the seconds include starting the orchestrator and agent and
               the prediction)

BM3D is not a dlorch dependency: it runs in its own virtual environment, bench/.venv-bm3d, which
this script creates with pip when it is missing (``--no-bm3d`` skips it); if pip cannot get the
package, its columns stay empty and the table says why.

    python bench/denoise_peers.py [--images camera moon isbi10] [--sigmas 15 25 50 pg]
                                  [--budgets 30 120 600] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DATA = REPO.parent / "shared" / "data" / "isbi2012-em"
BM3D_VENV = HERE / ".venv-bm3d"
SKIMAGE_GRAY = ("camera", "moon", "coins", "text")
SKIMAGE_COLOUR = ("astronaut", "coffee", "chelsea")
DEFAULT_IMAGES = ["camera", "moon", "astronaut", "coffee", "isbi10", "isbi20"]
PG_PEAK, PG_SIGMA = 30.0, 5.0


def load_image(name: str) -> np.ndarray:
    """A clean test image as float64 on a 0-255 scale: a scikit-image picture, or ``isbiN`` (ISBI slice N)."""
    if name.startswith("isbi"):
        return np.load(DATA / "isbi2012_train.npz")["image"][int(name[4:])].astype(np.float64)
    from skimage import color, data

    if name not in SKIMAGE_GRAY + SKIMAGE_COLOUR:
        raise SystemExit(f"unknown image {name!r}: pick from {', '.join(SKIMAGE_GRAY + SKIMAGE_COLOUR)} or isbiN")
    img = getattr(data, name)()
    if img.ndim == 3:
        return color.rgb2gray(img[..., :3]) * 255.0
    return img.astype(np.float64)


def add_noise(clean: np.ndarray, case: str, seed: int) -> tuple[np.ndarray, float]:
    """(noisy, the noise's true sigma): Gaussian of sigma ``case``, or Poisson-Gaussian for "pg"."""
    rng = np.random.default_rng(seed)
    if case == "pg":
        photons = rng.poisson(np.clip(clean, 0, None) / 255.0 * PG_PEAK)
        noisy = photons * (255.0 / PG_PEAK) + rng.normal(0, PG_SIGMA, clean.shape)
        return noisy, float(np.std(noisy - clean))
    sigma = float(case)
    return clean + rng.normal(0, sigma, clean.shape), sigma


def scores(estimate: np.ndarray, clean: np.ndarray) -> tuple[float, float]:
    """(PSNR, SSIM) against the clean image, data range 255."""
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    est = np.asarray(estimate, np.float64)
    return (float(peak_signal_noise_ratio(clean, est, data_range=255.0)),
            float(structural_similarity(clean, est, data_range=255.0)))


def estimated_sigma(noisy: np.ndarray) -> float:
    """scikit-image's ``estimate_sigma`` (Donoho's MAD of the finest diagonal wavelet details); without
    PyWavelets the same estimator on Haar details."""
    try:
        import pywt  # noqa: F401
    except ImportError:
        h, w = (noisy.shape[0] // 2) * 2, (noisy.shape[1] // 2) * 2
        x = noisy[:h, :w]
        hh = (x[0::2, 0::2] - x[0::2, 1::2] - x[1::2, 0::2] + x[1::2, 1::2]) / 2
        return float(np.median(np.abs(hh)) / 0.6745)
    from skimage.restoration import estimate_sigma

    return float(estimate_sigma(noisy))


def have_pywt() -> bool:
    try:
        import pywt  # noqa: F401
    except ImportError:
        return False
    return True


def run_nlm(noisy: np.ndarray) -> np.ndarray:
    from skimage.restoration import denoise_nl_means

    s = estimated_sigma(noisy)
    return denoise_nl_means(noisy, h=0.8 * s, sigma=s, fast_mode=True, patch_size=5, patch_distance=6)


def run_wavelet(noisy: np.ndarray) -> np.ndarray:
    from skimage.restoration import denoise_wavelet

    return denoise_wavelet(noisy, sigma=estimated_sigma(noisy), method="BayesShrink", mode="soft",
                           rescale_sigma=True)


def bm3d_python() -> tuple[Path | None, str]:
    """The BM3D environment's interpreter, creating it with pip if needed; or (None, why not)."""
    py = BM3D_VENV / "bin" / "python"
    check = [str(py), "-c", "import bm3d"]
    if py.exists() and subprocess.run(check, capture_output=True).returncode == 0:
        return py, ""
    try:
        subprocess.run([sys.executable, "-m", "venv", str(BM3D_VENV)], check=True, capture_output=True)
        (BM3D_VENV / ".gitignore").write_text("*\n")
        subprocess.run([str(py), "-m", "pip", "install", "-q", "bm3d", "numpy"], check=True, capture_output=True,
                       timeout=900)
    except (subprocess.SubprocessError, OSError) as e:
        return None, f"bm3d could not be installed into {BM3D_VENV} ({type(e).__name__})"
    if subprocess.run(check, capture_output=True).returncode != 0:
        return None, "bm3d installed but does not import"
    return py, ""


def run_bm3d(py: Path, noisy: np.ndarray, sigma: float, tmp: Path) -> tuple[np.ndarray, float]:
    """BM3D in its own environment (this file's ``--bm3d-worker`` mode): (estimate, seconds of BM3D itself)."""
    src, dst = tmp / "bm3d_in.npy", tmp / "bm3d_out.npy"
    np.save(src, noisy)
    cp = subprocess.run([str(py), __file__, "--bm3d-worker", str(src), str(sigma), str(dst)], capture_output=True,
                        text=True)
    if cp.returncode != 0:
        raise RuntimeError(f"bm3d failed: {cp.stderr.strip().splitlines()[-1:]}")
    return np.load(dst), float(cp.stdout.strip().splitlines()[-1])


def bm3d_worker(src: str, sigma: str, dst: str) -> None:
    import bm3d

    noisy = np.load(src)
    t0 = time.perf_counter()
    out = bm3d.bm3d(noisy, sigma_psd=float(sigma))
    seconds = time.perf_counter() - t0
    np.save(dst, np.asarray(out, np.float64))
    print(seconds)


def run_dlorch(noisy: np.ndarray, budget: float, tmp: Path) -> np.ndarray:
    """`dlorch denoise --time-budget` on a fresh embedded home."""
    src, out = tmp / "noisy.npy", tmp / f"dlorch-{budget:g}.npy"
    np.save(src, noisy.astype(np.float32))
    env = {**os.environ, "DLORCH_HOME": str(tmp / f"home-{budget:g}")}
    for v in ("DLORCH_STORE", "DLORCH_QUEUE"):
        env.pop(v, None)
    cp = subprocess.run([sys.executable, "-m", "dlorch.orchestrator.cli", "denoise", str(src), "--out", str(out),
                         "--time-budget", str(budget)], env=env, capture_output=True, text=True)
    if cp.returncode != 0:
        raise RuntimeError(f"dlorch denoise failed: {cp.stderr.strip().splitlines()[-1:]}")
    return np.load(out).astype(np.float64)


def main(argv: list[str] | None = None) -> dict:
    if argv is None and len(sys.argv) == 5 and sys.argv[1] == "--bm3d-worker":
        bm3d_worker(*sys.argv[2:])
        return {}
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", nargs="+", default=DEFAULT_IMAGES)
    ap.add_argument("--sigmas", nargs="+", default=["15", "25", "50", "pg"], help="Gaussian sigmas and/or pg")
    ap.add_argument("--budgets", nargs="+", type=float, default=[30, 120, 600], help="dlorch time budgets (s)")
    ap.add_argument("--no-bm3d", action="store_true", help="leave the BM3D columns empty")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)

    py, why = (None, "skipped (--no-bm3d)") if args.no_bm3d else bm3d_python()
    if py is None:
        print(f"BM3D: {why}; its rows stay empty", flush=True)
    if not have_pywt():
        print("wavelet: PyWavelets is not installed in this environment; its rows stay empty, and sigma is "
              "estimated on Haar details", flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="dlorch-peers-") as tmp_s:
        tmp = Path(tmp_s)
        for i, name in enumerate(args.images):
            clean = load_image(name)
            for j, case in enumerate(args.sigmas):
                noisy, sigma = add_noise(clean, case, seed=1000 * i + j)
                est = estimated_sigma(noisy)
                methods = [("noisy", lambda: noisy), ("nlm", lambda: run_nlm(noisy))]
                if have_pywt():  # scikit-image's wavelets need PyWavelets
                    methods.append(("wavelet", lambda: run_wavelet(noisy)))
                if py is not None:
                    methods += [("bm3d-true", lambda: run_bm3d(py, noisy, sigma, tmp)),
                                ("bm3d-est", lambda: run_bm3d(py, noisy, est, tmp))]
                methods += [(f"dlorch-{b:g}s", lambda b=b: run_dlorch(noisy, b, tmp)) for b in args.budgets]
                for method, fn in methods:
                    t0 = time.perf_counter()
                    try:
                        out = fn()
                    except RuntimeError as e:
                        print(f"{name} {case} {method}: {e}", flush=True)
                        continue
                    seconds = time.perf_counter() - t0
                    if isinstance(out, tuple):  # BM3D reports its own seconds, without the environment's start
                        out, seconds = out
                    p, s = scores(out, clean)
                    row = {"image": name, "noise": case, "sigma": sigma, "sigma_est": est, "method": method,
                           "psnr": p, "ssim": s, "seconds": seconds}
                    rows.append(row)
                    print(f"{name:10} {case:>4} {method:12} PSNR {p:6.2f}  SSIM {s:.3f}  {seconds:7.1f} s", flush=True)
    print_table(rows, args)
    result = {"date": date.today().isoformat(), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
              "bm3d": why or "installed", "pywavelets": have_pywt(), "rows": rows}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))
        print(f"wrote {args.json}")
    return result


def print_table(rows: list[dict], args) -> None:
    """Mean PSNR / SSIM / seconds per noise case and method, over the images."""
    methods = list(dict.fromkeys(r["method"] for r in rows))
    print(f"\n{'noise':>6} {'method':12} {'PSNR':>7} {'SSIM':>6} {'seconds':>8}   ({len(args.images)} images)")
    for case in args.sigmas:
        for m in methods:
            sel = [r for r in rows if r["noise"] == case and r["method"] == m]
            if sel:
                print(f"{case:>6} {m:12} {np.mean([r['psnr'] for r in sel]):7.2f} "
                      f"{np.mean([r['ssim'] for r in sel]):6.3f} {np.mean([r['seconds'] for r in sel]):8.1f}")


if __name__ == "__main__":
    main()

"""Model commands: ``segment`` and ``denoise`` (train, then predict), ``train segment|denoise``, ``predict``."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from dlorch.orchestrator import submit
from dlorch.orchestrator.cli.common import DETACH, EPOCHS, PRIORITY, TIME_BUDGET, TTA_HELP, client, run_job

train_app = typer.Typer(no_args_is_help=True, help="Train a model without predicting.")

# Options of the trainings a bootstrapping round runs (the wizard's rounds, or a user's own).
INIT_FROM = typer.Option(None, "--init-from", metavar="MODEL",
                         help="start from this segmentation model's weights (a training job's id or a .ckpt; same "
                              "classes): fine-tuning after more labels")
ACCEPTED = typer.Option(None, "--accepted", metavar="LABELS",
                        help="a second label map of pixels accepted from a prediction (0 = none, 1..K); where "
                             "--labels paints a pixel too, the painted label wins")
ACCEPTED_WEIGHT = typer.Option(None, "--accepted-weight", metavar="W",
                               help="loss weight of accepted pixels relative to painted ones, in (0, 1] (default 0.5)")
CONFIDENCE = typer.Option(False, "--confidence",
                          help="segmentation: also write the per-pixel confidence (uint8, max probability x 255) "
                               "beside OUT, as OUT's name with .confidence before its suffix")


def segment(
    image: str = typer.Argument(..., help="image: TIFF, zarr, .npy or .npz (file.npz:NAME picks an array)"),
    labels: str = typer.Option(..., "--labels", help="sparse labels on the same grid: 0 = unlabelled, 1..K"),
    out: Path = typer.Option(..., "-o", "--out", help="label map to write: .tif, .zarr or .npy"),
    epochs: Optional[int] = EPOCHS,
    time_budget: Optional[float] = TIME_BUDGET,
    priority: int = PRIORITY,
    candidates: int = typer.Option(1, "--candidates", min=1, help="train N candidate models in parallel, keep the best"),
    tta: Optional[bool] = typer.Option(None, "--tta/--no-tta", show_default=False, help=TTA_HELP),
    init_from: Optional[str] = INIT_FROM,
    accepted: Optional[str] = ACCEPTED,
    accepted_weight: Optional[float] = ACCEPTED_WEIGHT,
    confidence: bool = CONFIDENCE,
    detach: bool = DETACH,
) -> None:
    """Train on sparse labels and segment the image (one job; with --candidates, N jobs and the best predicts)."""
    fmt = submit.checked_output_format(out, [image, labels, accepted])
    if confidence:
        submit.checked_output_format(submit.confidence_path(out), [image, labels, accepted])
    c = client()
    spec = submit.segmentation_spec(c, "segment", image, labels, epochs, time_budget, priority, fmt, tta,
                                    init_from, accepted, accepted_weight, confidence)
    if candidates > 1:
        best = run_candidates(c, submit.training_of(spec), candidates, detach)
        if best is not None:
            run_job(c, submit.prediction_after_training(spec, best.model), detach=False, out=out)
        return
    run_job(c, spec, detach, out=out)


def denoise(
    image: str = typer.Argument(..., help="noisy image: TIFF, zarr, .npy or .npz (file.npz:NAME picks an array)"),
    out: Path = typer.Option(..., "-o", "--out", help="denoised image to write (float32): .tif, .zarr or .npy"),
    second: Optional[str] = typer.Option(None, "--second", help="a second noisy acquisition: Noise2Noise"),
    clean: Optional[str] = typer.Option(None, "--clean", help="a clean target of the same scene: supervised (CARE)"),
    epochs: Optional[int] = EPOCHS,
    time_budget: Optional[float] = TIME_BUDGET,
    priority: int = PRIORITY,
    detach: bool = DETACH,
) -> None:
    """Denoise an image, self-supervised from the noisy image alone (Noise2Void) unless given more."""
    fmt = submit.checked_output_format(out, [image, second, clean])
    c = client()
    run_job(c, submit.denoising_spec(c, "denoise", image, second, clean, epochs, time_budget, priority, fmt),
            detach, out=out)


@train_app.command("denoise")
def train_denoise(
    image: str = typer.Argument(..., help="noisy image"),
    second: Optional[str] = typer.Option(None, "--second", help="a second noisy acquisition: Noise2Noise"),
    clean: Optional[str] = typer.Option(None, "--clean", help="a clean target: supervised (CARE)"),
    out: Optional[Path] = typer.Option(None, "-o", "--out", help="also copy the model checkpoint here"),
    epochs: Optional[int] = EPOCHS,
    time_budget: Optional[float] = TIME_BUDGET,
    priority: int = PRIORITY,
    detach: bool = DETACH,
) -> None:
    """Train a denoising model; `dlorch predict JOB IMAGE` applies it."""
    submit.check_checkpoint_out(out, [image, second, clean])
    c = client()
    run_job(c, submit.denoising_spec(c, "train", image, second, clean, epochs, time_budget, priority), detach, out=out)


@train_app.command("segment")
def train_segment(
    image: str = typer.Argument(..., help="image: TIFF, zarr, .npy or .npz"),
    labels: str = typer.Option(..., "--labels", help="sparse labels: 0 = unlabelled, 1..K"),
    out: Optional[Path] = typer.Option(None, "-o", "--out", help="also copy the model checkpoint here"),
    epochs: Optional[int] = EPOCHS,
    time_budget: Optional[float] = TIME_BUDGET,
    priority: int = PRIORITY,
    candidates: int = typer.Option(1, "--candidates", min=1, help="train N candidate models in parallel"),
    init_from: Optional[str] = INIT_FROM,
    accepted: Optional[str] = ACCEPTED,
    accepted_weight: Optional[float] = ACCEPTED_WEIGHT,
    detach: bool = typer.Option(False, "--detach", help="print only the job id(s) and return"),
) -> None:
    """Train a segmentation model; `dlorch predict JOB IMAGE` applies it."""
    submit.check_checkpoint_out(out, [image, labels, accepted])
    c = client()
    spec = submit.segmentation_spec(c, "train", image, labels, epochs, time_budget, priority,
                                    init_from=init_from, accepted=accepted, accepted_weight=accepted_weight)
    if candidates > 1:
        best = run_candidates(c, spec, candidates, detach)
        if best is not None and out is not None:
            c.fetch(best.model, out)
        return
    run_job(c, spec, detach, out=out)


def predict(
    model: str = typer.Argument(..., help="id of a succeeded training job, a model .ckpt path/URI, or a "
                                          "bioimage.io .zip that dlorch export wrote"),
    image: str = typer.Argument(..., help="image to segment or denoise (the model's task); a .zarr volume (path or"
                                          " s3:// URL) into .zarr is predicted blockwise, memory-bounded"),
    out: str = typer.Option(..., "-o", "--out", help="labels or denoised image to write: .tif, .zarr or .npy; or an"
                                                   " s3://... .zarr URL"),
    priority: int = PRIORITY,
    block_voxels: Optional[int] = typer.Option(None, "--block-voxels", min=1,
                                               help="blockwise: voxels per block (default: ~3 s of compute, measured)"),
    tta: Optional[bool] = typer.Option(None, "--tta/--no-tta", show_default=False, help=TTA_HELP),
    confidence: bool = CONFIDENCE,
    detach: bool = DETACH,
) -> None:
    """Segment or denoise an image with a trained model."""
    fmt = submit.checked_output_format(out, [image])
    local = submit.local_output(out)
    if confidence and local is not None:
        submit.checked_output_format(submit.confidence_path(local), [image])
    c = client()
    spec = submit.prediction_spec(c, model, image, out, fmt, priority, block_voxels, tta, confidence)
    run_job(c, spec, detach, out=submit.local_output(out))


def run_candidates(c, spec: dict[str, Any], n: int, detach: bool):
    """Submit one training job per model variant, follow them together, print their validation table.

    Returns the best candidate's job, or None when detached (its ids printed instead).
    """
    from dlorch.orchestrator.cli import views
    from dlorch.orchestrator.client import local_service

    specs = submit.candidate_specs(spec, n)
    if detach:
        for job_id in [c.submit(s) for s in specs.values()]:
            typer.echo(job_id)
        return None
    with local_service(c, agents=n) as service:
        ids = {c.submit(s): v for v, s in specs.items()}
        finals = views.follow_many(c, list(ids), service)
    views.candidates_table(finals, ids)
    best = submit.best_candidate(finals)
    typer.echo(f"best: {ids[best.id]} ({best.id}), held-out stroke IoU {best.metrics.get('best_val_iou', 0):.4f}",
               err=True)
    return best

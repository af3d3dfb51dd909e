"""``dlorch export``: a trained model as a BioImage Model Zoo package (bioimage.io .zip)."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Optional

import typer

from dlorch.core.errors import BadInput
from dlorch.orchestrator.cli.common import client


def export(
    model: str = typer.Argument(..., help="id of a succeeded training job, or a model .ckpt path/URI"),
    out: Path = typer.Option(..., "-o", "--out", help="the package to write, a .zip"),
    image: Optional[str] = typer.Option(None, "--image", help="image whose central tile becomes the test tensors "
                                                              "(default: the training job's image)"),
    name: Optional[str] = typer.Option(None, "--name", help="the model's name in the package"),
) -> None:
    """Write a segmentation or denoising model as a bioimage.io package: TorchScript weights, specs, test tensors."""
    from dlorch.core.imageio import check_output_path, read_image, split_key
    from dlorch.orchestrator.inputs import model_uri

    if out.suffix.lower() != ".zip":
        raise BadInput(f"-o {out}: a bioimage.io package is a .zip; give a name ending in .zip")
    check_output_path(out, [model] + ([image] if image else []), fmt="npy")  # a single file: the same rules
    try:
        from dlorch.orchestrator.export import export_model
    except ImportError as e:
        raise BadInput(f"dlorch export needs bioimageio.spec ({e.name} is missing); "
                       "pip install 'dlorch[bioimageio]'") from None
    c = client()
    uri, _ = model_uri(c, model)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = c.fetch(uri, Path(tmp) / "model.ckpt")
        if image is None:
            if Path(model).exists() or "://" in model or model.endswith(".ckpt"):
                raise BadInput("a model file carries no image; give --image IMAGE for its test tensors")
            job = c.ledger.get(model)
            src = c.fetch(job.spec.image, Path(tmp) / f"image{Path(job.spec.image).suffix}")
            array = read_image(src)
        else:
            array = read_image(*split_key(image))
        export_model(checkpoint, array, out, name)
    typer.echo(str(out))

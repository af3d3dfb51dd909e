"""A trained model as a BioImage Model Zoo package (bioimage.io, spec 0.5): TorchScript weights, specs, test tensors.

The package runs in any bioimage.io consumer (deepImageJ, ilastik, bioimageio.core) without dlorch:

- weights: the engine's network (batch norms folded, as dlorch predicts with it) traced with
  TorchScript on one tile of a fixed size the plan allows (a multiple of the network's divisor);
  and the same network's state dict (``pytorch_state_dict``) with its architecture named as
  ``dlorch.orchestrator.zoonet.dlorch_unet`` and the training plan: what ``dlorch predict model.zip``
  loads (weights only, never the TorchScript code; ``zooimport``) and bioimageio.core runs where dlorch is;
- inputs: one channel, (z,) y, x, raw intensities; the engine's normalisation: segmentation clips
  to the tile's 0.5-99.5 percentile window and z-scores, inside the TorchScript module (exactly as
  the engine; the spec's steps clip in another order); denoising subtracts the training image's
  mean and divides by its std (the spec's ``fixed_zero_mean_unit_variance``);
- outputs: class probabilities (segmentation; class c+1 in channel c), or the denoised image (the
  network's output mapped back to image units by ``scale_linear``);
- test tensors: a tile of the image the model was trained on, and what dlorch computes on it;
- a cover image (the tile and its result), a README, and the methods' citations.

What the package leaves out: the class-prior correction and test-time augmentation of segmentation,
and the posterior step of Noise2Void; consumers tile with their own blending.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from dlorch.core.errors import BadInput

MAX_TILE = 256  # in-plane side of the exported tile (3D: 64 along every axis), at most the plan's window
CITATIONS = {
    "segmentation": [("Ronneberger, Fischer, Brox. U-Net: convolutional networks for biomedical image "
                      "segmentation. MICCAI 2015.", "10.1007/978-3-319-24574-4_28"),
                     ("Isensee et al. nnU-Net: a self-configuring method for deep learning-based biomedical "
                      "image segmentation. Nature Methods 2021.", "10.1038/s41592-020-01008-z")],
    "denoising": [("Krull, Buchholz, Jug. Noise2Void - learning denoising from single noisy images. CVPR 2019.",
                   "10.1109/CVPR.2019.00223"),
                  ("Lehtinen et al. Noise2Noise: learning image restoration without clean data. ICML 2018.",
                   "10.48550/arXiv.1803.04189"),
                  ("Weigert et al. Content-aware image restoration: pushing the limits of fluorescence "
                   "microscopy. Nature Methods 2018.", "10.1038/s41592-018-0216-7")],
}


def load(checkpoint: Path) -> tuple[str, Any, Any]:
    """(task, network, plan) of a dlorch checkpoint; ``BadInput`` if it is none."""
    from dlorch.core.engine.checkpoint import read_checkpoint
    from dlorch.core.engine.denoise.module import CKPT_KEY as DENOISE_KEY

    try:
        ckpt = read_checkpoint(checkpoint, str(checkpoint))
        if DENOISE_KEY in ckpt:
            from dlorch.core.engine.denoise.predict import load_denoiser

            return ("denoising", *load_denoiser(checkpoint))
        from dlorch.core.engine.segment.predict import load_model

        return ("segmentation", *load_model(checkpoint))
    except ValueError as e:
        raise BadInput(str(e)) from None


def tile_shape(plan: Any, image_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The exported tile: the plan's window, at most ``MAX_TILE`` (64 in 3D) and the image, a multiple of the divisor."""
    dims = plan.spatial_dims
    divisor = 2 ** (len(plan.filters) - 1) * getattr(plan, "input_scale", 1)
    roi = list(plan.infer_roi) if isinstance(plan.infer_roi, (list, tuple)) else [int(plan.infer_roi)] * dims
    cap = MAX_TILE if dims == 2 else 64
    shape = []
    for r, n in zip(roi[-dims:], image_shape[-dims:]):
        side = min(int(r), cap, int(n)) // divisor * divisor
        if side < divisor:
            raise BadInput(f"the image ({'x'.join(map(str, image_shape))}) is smaller than one tile of this "
                           f"model ({divisor} pixels a side); export with a larger --image")
        shape.append(side)
    return tuple(shape)


def sample_tile(image: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """The central tile of ``shape`` of an image ((Z,) Y, X; a 2D tile of a stack from its middle slice)."""
    stack = image if image.ndim == 3 else image[None]
    if len(shape) == 2:
        stack = stack[stack.shape[0] // 2]
    starts = [(n - s) // 2 for n, s in zip(stack.shape, shape)]
    return np.ascontiguousarray(stack[tuple(slice(a, a + s) for a, s in zip(starts, shape))])


def dlorch_output(task: str, net, plan, tile: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(input tensor, output tensor) of a tile as dlorch computes them: the engine's normalisation, its network."""
    import torch

    if task == "segmentation":
        from dlorch.core.engine.segment.intensity import normalize

        x = normalize(tile)
        model = net  # the engine's normalisation here; the exported module does its own
    else:
        from dlorch.core.engine.denoise.intensity import normalise_input

        x = normalise_input(tile, plan)
        model = net
    with torch.inference_mode():
        y = model(torch.from_numpy(np.ascontiguousarray(x[None, None], dtype=np.float32))).float()
        y = (torch.softmax(y, dim=1) if task == "segmentation" else y).numpy()
    if task == "denoising":
        y = y * np.float32(plan.target_std) + np.float32(plan.target_mean)
    return tile[None, None].astype(np.float32), y.astype(np.float32)


def trace(task: str, net, tile_shape_: tuple[int, ...], path: Path) -> Path:
    """TorchScript of the network (with the softmax for segmentation), traced on one tile."""
    import torch

    from dlorch.orchestrator.zoonet import Probabilities

    model = Probabilities(net) if task == "segmentation" else net
    model.eval()
    example = torch.zeros((1, 1, *tile_shape_), dtype=torch.float32)
    with torch.no_grad():
        traced = torch.jit.trace(model, example, check_trace=False)
    traced.save(str(path))
    return path


def cover(tile: np.ndarray, output: np.ndarray, task: str, path: Path) -> Path:
    """A 2:1 PNG: the input tile (its middle slice) beside its result (classes in colour, or the denoised image)."""
    from PIL import Image

    def plane(a: np.ndarray) -> np.ndarray:
        return a[a.shape[0] // 2] if a.ndim == 3 else a

    def grey(a: np.ndarray) -> np.ndarray:
        lo, hi = np.percentile(a, [0.5, 99.5])
        return (np.clip((a - lo) / max(hi - lo, 1e-6), 0, 1) * 255).astype(np.uint8)

    left = np.repeat(grey(plane(tile.astype(np.float32)))[..., None], 3, axis=2)
    if task == "segmentation":
        palette = np.array([[230, 25, 75], [60, 180, 75], [0, 130, 200], [245, 130, 48], [145, 30, 180],
                            [70, 240, 240], [240, 50, 230], [210, 245, 60]], dtype=np.uint8)
        classes = np.argmax(output[0], axis=0)
        right = palette[plane(classes) % len(palette)]
        right = (0.6 * right + 0.4 * left).astype(np.uint8)
    else:
        right = np.repeat(grey(plane(output[0, 0]))[..., None], 3, axis=2)
    Image.fromarray(np.concatenate([left, right], axis=1)).save(path)
    return path


def export_model(checkpoint: Path, image: np.ndarray, out: Path, name: str | None = None) -> Path:
    """Write ``checkpoint`` (a dlorch ``.ckpt``) as a bioimage.io package ``out`` (.zip), its test tensors from ``image``.

    Returns:
        ``out``.
    """
    import torch
    from bioimageio.spec import save_bioimageio_package
    from bioimageio.spec.model import v0_5 as bio

    from dlorch.orchestrator.zoonet import CALLABLE, IMPORT_FROM, checkpoint_weights

    task, net, plan = load(checkpoint)
    version = bio.Version(torch.__version__.split("+")[0])
    net.eval()
    shape = tile_shape(plan, image.shape)
    tile = sample_tile(image, shape)
    x, y = dlorch_output(task, net, plan, tile)
    axes = "zyx"[-len(shape):]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        np.save(tmp / "test_input.npy", x)
        np.save(tmp / "test_output.npy", y)
        weights = trace(task, net, shape, tmp / "weights.pt")
        state = tmp / "weights_state_dict.pt"
        torch.save(checkpoint_weights(checkpoint, task), state)
        cover(tile, y, task, tmp / "cover.png")
        (tmp / "README.md").write_text(_readme(task, plan, shape))
        space_in = [bio.SpaceInputAxis(id=bio.AxisId(a), size=s) for a, s in zip(axes, shape)]
        space_out = [bio.SpaceOutputAxis(id=bio.AxisId(a), size=s) for a, s in zip(axes, shape)]
        if task == "segmentation":
            pre = [bio.EnsureDtypeDescr(kwargs=bio.EnsureDtypeKwargs(dtype="float32"))]  # normalised in the module
            post = []
            channels = [bio.Identifier(f"class{k + 1}") for k in range(plan.num_classes)]
            out_id, what = "probabilities", f"probability of each of {plan.num_classes} classes (labels 1..K)"
        else:
            pre = [bio.EnsureDtypeDescr(kwargs=bio.EnsureDtypeKwargs(dtype="float32")),
                   bio.FixedZeroMeanUnitVarianceDescr(kwargs=bio.FixedZeroMeanUnitVarianceKwargs(
                       mean=float(plan.input_mean), std=float(plan.input_std)))]
            post = [bio.ScaleLinearDescr(kwargs=bio.ScaleLinearKwargs(gain=float(plan.target_std),
                                                                      offset=float(plan.target_mean)))]
            channels = [bio.Identifier("denoised")]
            out_id, what = "denoised", "the denoised image, in the input's units"
        inputs = [bio.InputTensorDescr(
            id=bio.TensorId("raw"), description="one channel of a grey-level image",
            axes=[bio.BatchAxis(), bio.ChannelAxis(channel_names=[bio.Identifier("raw")]), *space_in],
            test_tensor=bio.FileDescr(source=tmp / "test_input.npy"), preprocessing=pre)]
        outputs = [bio.OutputTensorDescr(
            id=bio.TensorId(out_id), description=what,
            axes=[bio.BatchAxis(), bio.ChannelAxis(channel_names=channels), *space_out],
            test_tensor=bio.FileDescr(source=tmp / "test_output.npy"), postprocessing=post)]
        kind = "U-Net segmentation" if task == "segmentation" else f"{plan.mode.upper()} denoising U-Net"
        descr = bio.ModelDescr(
            name=name or f"dlorch {task} {len(shape)}D",
            description=f"{kind} trained by dlorch ({len(shape)}D, tile {'x'.join(map(str, shape))})",
            authors=[bio.Author(name="dlorch")], license=bio.LicenseId("MIT"),
            cite=[bio.CiteEntry(text=t, doi=bio.Doi(d)) for t, d in CITATIONS[task]],
            covers=[bio.FileDescr(source=tmp / "cover.png")], documentation=bio.FileDescr(source=tmp / "README.md"),
            tags=["dlorch", task, f"{len(shape)}d", "unet", "pytorch"],
            inputs=inputs, outputs=outputs,
            weights=bio.WeightsDescr(
                pytorch_state_dict=bio.PytorchStateDictWeightsDescr(
                    source=state, pytorch_version=version, architecture=bio.ArchitectureFromLibraryDescr(
                        import_from=IMPORT_FROM, callable=bio.Identifier(CALLABLE),
                        kwargs={"task": task, "plan": plan.model_dump(mode="json")})),
                torchscript=bio.TorchscriptWeightsDescr(source=weights, pytorch_version=version,
                                                        parent="pytorch_state_dict")))
        out.parent.mkdir(parents=True, exist_ok=True)
        save_bioimageio_package(descr, output_path=out)
    return out


def _readme(task: str, plan: Any, shape: tuple[int, ...]) -> str:
    dims = len(shape)
    return (f"# dlorch {task} model\n\nA U-Net ({dims}D, {len(plan.filters)} levels, filters "
            f"{', '.join(map(str, plan.filters))}) trained by dlorch"
            + (f" on sparse labels of {plan.num_classes} classes" if task == "segmentation" else
               f" for denoising ({plan.mode})")
            + f".\n\nOne tile is {'x'.join(map(str, shape))} ({'zyx'[-dims:]}); tile larger images with overlap.\n"
            "Normalisation is in the preprocessing; the class-prior correction, test-time augmentation and "
            "the Noise2Void posterior step that dlorch applies are left out.\n")

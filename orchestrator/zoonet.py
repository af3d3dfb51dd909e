"""dlorch's networks as a bioimage.io package names them: an architecture built from a plan, and its weights.

A package ``dlorch export`` writes carries two weight formats of one network: TorchScript (runs
anywhere, without dlorch) and ``pytorch_state_dict`` whose architecture is ``dlorch_unet`` of this
module, with the task and the training plan as its arguments. bioimageio.core rebuilds the network
through it where dlorch is installed, and ``dlorch predict model.zip`` (``zooimport``) loads the same
state dict into the same network: data only, no code from the package.

The module a package names is the network dlorch predicts with, before its batch norms are folded:
for segmentation wrapped in the engine's normalisation and a softmax over the classes (what the
package's output is), for denoising the bare U-Net (the package's pre- and postprocessing normalise).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

IMPORT_FROM = "dlorch.orchestrator.zoonet"  # the architecture's module, as a package names it
CALLABLE = "dlorch_unet"
TASKS = ("segmentation", "denoising")


class Probabilities(torch.nn.Module):
    """The segmentation network of a package: the engine's normalisation, the network, a softmax over classes.

    The normalisation (clip to the tile's 0.5-99.5 percentiles, then z-score, as
    ``segment/intensity.normalize``) is part of the module: the spec's ``scale_range`` differs from
    it by the clipping's order, and consumers apply the module's own exactly.
    """

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(x.shape[0], -1)
        q = torch.quantile(flat, torch.tensor([0.005, 0.995], dtype=x.dtype), dim=1)  # (2, B)
        shape = [x.shape[0]] + [1] * (x.dim() - 1)
        c = torch.maximum(torch.minimum(x, q[1].reshape(shape)), q[0].reshape(shape))
        cf = c.reshape(x.shape[0], -1)
        mean = cf.mean(dim=1).reshape(shape)
        std = torch.clamp(cf.std(dim=1, unbiased=False), min=1e-6).reshape(shape)
        return torch.softmax(self.inner((c - mean) / std), dim=1)


def plan_of(task: str, plan: dict[str, Any]):
    """The task's plan from its JSON form (pydantic-checked); ``ValueError`` for another task or a bad plan."""
    from pydantic import ValidationError

    from dlorch.core.errors import first_problem

    if task == "segmentation":
        from dlorch.core.engine.segment import SegmentationPlan as plan_type
    elif task == "denoising":
        from dlorch.core.engine.denoise import DenoisingPlan as plan_type
    else:
        raise ValueError(f"task {task!r} is none of {', '.join(TASKS)}")
    try:
        return plan_type.model_validate(plan)
    except ValidationError as e:
        raise ValueError(f"its {task} plan is damaged ({first_problem(e)})") from None


def dlorch_unet(task: str, plan: dict[str, Any]) -> torch.nn.Module:
    """The network a ``pytorch_state_dict`` entry of a dlorch package names, untrained, in eval mode.

    Args:
        task: "segmentation" or "denoising".
        plan: the training plan (JSON), which fixes the network's shape.
    """
    p = plan_of(task, plan)
    if task == "segmentation":
        from dlorch.core.engine.segment.module import build_segmenter

        return Probabilities(build_segmenter(p)).eval()
    from dlorch.core.engine.denoise.module import build_denoiser

    return build_denoiser(p).eval()


def checkpoint_weights(checkpoint: Path, task: str) -> dict[str, torch.Tensor]:
    """The best weights of a dlorch checkpoint (batch norms not folded), keyed as ``dlorch_unet``'s state dict."""
    from dlorch.core.engine.checkpoint import read_checkpoint
    from dlorch.core.engine.denoise.module import CKPT_KEY as DENOISE_KEY
    from dlorch.core.engine.segment.module import CKPT_KEY as SEGMENT_KEY

    ckpt = read_checkpoint(checkpoint)
    own = ckpt[SEGMENT_KEY if task == "segmentation" else DENOISE_KEY]
    state = own.get("best_state")
    if state is None:  # as load_network: the last weights, where training kept no best
        state = {k[len("net."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("net.")}
    prefix = "inner." if task == "segmentation" else ""
    return {prefix + k: v.detach().to("cpu").contiguous() for k, v in state.items()}


def network_weights(state: dict[str, torch.Tensor], task: str) -> dict[str, torch.Tensor]:
    """``dlorch_unet``'s state dict as a checkpoint's ``best_state`` holds it (the network alone)."""
    prefix = "inner." if task == "segmentation" else ""
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}

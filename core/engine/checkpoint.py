"""A trained network from a checkpoint: the task's own section, its plan, its best weights, batch norms folded.

A checkpoint is Lightning's file; each task's module adds a section of its own under its key
(``segment.module.CKPT_KEY``, ``denoise.module.CKPT_KEY``) holding the plan and the best weights,
which is all prediction needs.
"""

from __future__ import annotations

import pathlib
from collections.abc import Callable
from typing import TypeVar

import torch
from pydantic import BaseModel, ValidationError

from dlorch.core.engine.network import fold_batch_norm
from dlorch.core.errors import first_problem

P = TypeVar("P", bound=BaseModel)


def load_network(
    checkpoint: pathlib.Path, *, key: str, plan_type: type[P], build: Callable[[P], torch.nn.Module], task: str
) -> tuple[torch.nn.Module, P, dict]:
    """Rebuild a task's network with its best weights from a training checkpoint.

    Args:
        checkpoint: a ``.ckpt`` written by ``train_<task>``.
        key: the task's section in the checkpoint.
        plan_type: the task's plan class.
        build: the network a plan describes.
        task: "segmentation" or "denoising", for the errors.

    Returns:
        (network in eval mode on CPU with its batch norms folded into its convolutions, its plan,
        the task's section for what else it holds).

    Raises:
        ValueError: the file is not a dlorch checkpoint of this task, or its plan or weights are damaged.
    """
    # weights_only: a checkpoint may come from another node's store; never unpickle code from it.
    ckpt = torch.load(pathlib.Path(checkpoint), map_location="cpu", weights_only=True)
    own = ckpt.get(key) if isinstance(ckpt, dict) else None
    if not own or "plan" not in own:
        raise ValueError(f"{checkpoint} is not a dlorch {task} checkpoint; pass a .ckpt from train_{task}")
    try:
        plan = plan_type.model_validate(own["plan"])
    except ValidationError as e:
        raise ValueError(f"{checkpoint} holds a damaged plan ({first_problem(e)}); use the .ckpt its training wrote") from None
    try:
        net = build(plan)
    except (IndexError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{checkpoint} holds a plan no network can be built from ({e}); use the .ckpt its "
                         "training wrote") from None
    state = own.get("best_state")
    if state is None:
        prefix = "net."
        state = {k[len(prefix) :]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    try:
        net.load_state_dict(state)
    except RuntimeError:  # torch lists every mismatched tensor, on a hundred lines
        raise ValueError(f"{checkpoint}: its weights do not fit the network its plan describes; use the .ckpt its "
                         "training wrote") from None
    return fold_batch_norm(net), plan, own

"""A trained network from a checkpoint: the task's own section, its plan, its best weights, batch norms folded.

A checkpoint is Lightning's file; each task's module adds a section of its own under its key
(``segment.module.CKPT_KEY``, ``denoise.module.CKPT_KEY``) holding the plan and the best weights,
which is all prediction needs.

Every checkpoint is loaded as tensors and plain values only (``read_checkpoint``): a checkpoint
comes from the store, which another node or a user wrote, and nothing in it may run code here.
"""

from __future__ import annotations

import pathlib
import pickle
import warnings
from collections.abc import Callable
from typing import TypeVar

import torch
from pydantic import BaseModel, ValidationError

from dlorch.core.engine.network import fold_batch_norm
from dlorch.core.errors import BadInput, first_problem

P = TypeVar("P", bound=BaseModel)


class UnsafeCheckpoint(BadInput, ValueError):
    """A checkpoint holding more than tensors and plain values: only code from the file could rebuild it."""


def read_checkpoint(path: pathlib.Path, shown: str | None = None) -> dict:
    """A checkpoint's contents, loaded as tensors and plain values only: nothing in the file runs code.

    Args:
        path: the local file.
        shown: how the errors name it (the URI or path the user gave); ``path`` if None.

    Raises:
        UnsafeCheckpoint: the file holds objects that only code from it could rebuild, or is no pickle a
            weights-only load understands (never loaded; it stays refused wherever it is tried).
        ValueError: the file is not a readable checkpoint (truncated, empty, not a torch file).
    """
    shown = shown or str(path)
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols on the way to refusing a file
            warnings.simplefilter("ignore")
            ckpt = torch.load(pathlib.Path(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # torch's message advises weights_only=False: the one thing never to do here
        raise UnsafeCheckpoint(f"{shown} refused: it holds more than tensors and plain values (objects only code "
                               "from the file could rebuild) or is no checkpoint at all, and dlorch never runs code "
                               "from a checkpoint; use a .ckpt a dlorch training wrote") from None
    except Exception as e:  # truncated, empty, not a torch file
        raise ValueError(f"{shown} is not a readable model checkpoint (truncated, or not a .ckpt: "
                         f"{type(e).__name__}); pass the .ckpt a dlorch training wrote") from None
    if not isinstance(ckpt, dict):
        raise ValueError(f"{shown} is not a dlorch checkpoint (it holds a {type(ckpt).__name__}); pass the .ckpt "
                         "a dlorch training wrote")
    return ckpt


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
        UnsafeCheckpoint: the file would need code to load (see ``read_checkpoint``).
        ValueError: the file is not a dlorch checkpoint of this task, or its plan or weights are damaged.
    """
    ckpt = read_checkpoint(checkpoint)
    own = ckpt.get(key)
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

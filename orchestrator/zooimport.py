"""A bioimage.io package as a dlorch model: its state-dict weights loaded into dlorch's own network, as a ``.ckpt``.

``dlorch predict model.zip IMAGE`` (and every other place a model is named) takes a package whose
``pytorch_state_dict`` weights name dlorch's architecture (``zoonet.dlorch_unet``, what ``dlorch
export`` writes). The package is read as data only: its ``rdf.yaml`` with a safe YAML loader, its
plan checked as dlorch checks every plan, its weights loaded as tensors only, and the architecture
the package names is never imported: dlorch builds its own network from the plan and accepts the
package only if the names match. Its TorchScript weights are never loaded (TorchScript is a program,
and a package may come from anyone). Any other architecture is refused in one line: dlorch cannot
rebuild it from data, and running a package's own code is what this design avoids.

The result is an ordinary dlorch checkpoint (the task's section: plan and best weights), which the
store, the queue and every node handle as any other.
"""

from __future__ import annotations

import hashlib
import io
import pickle
import warnings
import zipfile
from pathlib import Path
from typing import Any

from dlorch.core.errors import BadInput, one_line

RDF_NAMES = ("rdf.yaml", "bioimageio.yaml")  # the description file of a package, at its root


def is_package(path: Path) -> bool:
    """Whether ``path`` is a bioimage.io package: a zip holding an ``rdf.yaml`` (or ``bioimageio.yaml``) at its root."""
    path = Path(path)
    if path.suffix.lower() != ".zip" or not path.is_file():
        return False
    try:
        with zipfile.ZipFile(path) as z:
            return any(n in RDF_NAMES or n.endswith(".bioimageio.yaml") for n in z.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def _description(z: zipfile.ZipFile, shown: str) -> dict[str, Any]:
    import yaml

    names = [n for n in z.namelist() if n in RDF_NAMES or (n.endswith(".bioimageio.yaml") and "/" not in n)]
    if not names:
        raise BadInput(f"{shown} is a zip without rdf.yaml, not a bioimage.io package; pass a package or a .ckpt")
    try:
        rdf = yaml.safe_load(z.read(names[0]))
    except yaml.YAMLError as e:
        raise BadInput(f"{shown}: its {names[0]} is not readable YAML ({one_line(e)}); export the package again") \
            from None
    if not isinstance(rdf, dict) or rdf.get("type") != "model":
        raise BadInput(f"{shown} describes no model (type {rdf.get('type') if isinstance(rdf, dict) else None!r}); "
                       "pass a bioimage.io model package")
    return rdf


def _dlorch_entry(rdf: dict[str, Any], shown: str) -> tuple[dict[str, Any], str, dict[str, Any]]:
    """The ``pytorch_state_dict`` entry of a dlorch package, its task and plan; one line for any other package."""
    from dlorch.orchestrator.zoonet import CALLABLE, IMPORT_FROM, TASKS

    weights = rdf.get("weights") if isinstance(rdf.get("weights"), dict) else {}
    entry = weights.get("pytorch_state_dict") if isinstance(weights.get("pytorch_state_dict"), dict) else None
    arch = entry.get("architecture") if entry and isinstance(entry.get("architecture"), dict) else {}
    named = f"{arch.get('import_from') or arch.get('source') or '?'}:{arch.get('callable') or '?'}"
    kwargs = arch.get("kwargs") if isinstance(arch.get("kwargs"), dict) else {}
    if entry is None or arch.get("import_from") != IMPORT_FROM or arch.get("callable") != CALLABLE:
        what = (f"weights {', '.join(sorted(weights)) or 'none'} and no pytorch_state_dict of dlorch's network"
                if entry is None else f"architecture {named}, not dlorch's")
        raise BadInput(f"{shown} is a bioimage.io model of another architecture ({what}); dlorch predicts with "
                       "packages `dlorch export` wrote and never runs a package's own code: run this one in "
                       "bioimageio.core, deepImageJ or ilastik")
    if kwargs.get("task") not in TASKS or not isinstance(kwargs.get("plan"), dict):
        raise BadInput(f"{shown}: its dlorch architecture has no task and plan ({sorted(kwargs)}); export the "
                       "package again with `dlorch export`")
    return entry, kwargs["task"], kwargs["plan"]


def _weights(z: zipfile.ZipFile, entry: dict[str, Any], shown: str) -> dict[str, Any]:
    """The entry's state dict, loaded as tensors only (checked against its sha256 where the package gives one)."""
    import torch

    source = str(entry.get("source") or "")
    if "://" in source or source.startswith("/") or ".." in source.split("/") or source not in z.namelist():
        raise BadInput(f"{shown}: its state-dict weights {source!r} are not a file inside the package; dlorch "
                       "reads packages whose weights they carry (as `dlorch export` writes them)")
    data = z.read(source)
    if entry.get("sha256") and hashlib.sha256(data).hexdigest() != str(entry["sha256"]).lower():
        raise BadInput(f"{shown}: its weights {source} do not match their sha256; the package is damaged, "
                       "download or export it again")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise BadInput(f"{shown}: its weights {source} hold more than tensors (objects only code could rebuild); "
                       "dlorch never runs code from a package") from None
    except Exception as e:
        raise BadInput(f"{shown}: its weights {source} are not readable ({type(e).__name__}); export the package "
                       "again") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise BadInput(f"{shown}: its weights {source} are not a state dict of tensors; export the package again")
    return state


def checkpoint_from_package(package: Path, out: Path, shown: str | None = None) -> tuple[str, Path]:
    """Write the dlorch checkpoint of a package ``dlorch export`` wrote.

    Args:
        package: the local ``.zip``.
        out: the ``.ckpt`` to write.
        shown: how errors name the package (the path the user gave).

    Returns:
        (task, ``out``).

    Raises:
        BadInput: not a package, another architecture, a damaged plan or weights that do not fit it.
    """
    import torch

    from dlorch.core.engine.denoise.module import CKPT_KEY as DENOISE_KEY
    from dlorch.core.engine.segment.module import CKPT_KEY as SEGMENT_KEY
    from dlorch.orchestrator.zoonet import dlorch_unet, network_weights

    shown = shown or str(package)
    try:
        z = zipfile.ZipFile(package)
    except (zipfile.BadZipFile, OSError) as e:
        raise BadInput(f"{shown} is not a readable zip ({one_line(e)}); pass a bioimage.io package or a .ckpt") \
            from None
    with z:
        entry, task, plan = _dlorch_entry(_description(z, shown), shown)
        state = _weights(z, entry, shown)
    try:
        net = dlorch_unet(task, plan)
    except ValueError as e:
        raise BadInput(f"{shown}: {e}; export the package again with `dlorch export`") from None
    try:
        net.load_state_dict(state)  # strict: every tensor of dlorch's network, and nothing else
    except RuntimeError:
        raise BadInput(f"{shown}: its weights do not fit the network its plan describes; export the package again") \
            from None
    key = SEGMENT_KEY if task == "segmentation" else DENOISE_KEY
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({key: {"plan": plan, "best_state": network_weights(net.state_dict(), task)}}, out)
    return task, out

"""What a node sends: its reports as protocol models, with the numbers JSON has not left out.

A NaN in sampled data (a loss of an all-empty validation tile, a statistic of an image with NaNs) must not
make a report unsendable (``wire.Signer.seal`` refuses it) nor reach the ledger: each non-finite number is
dropped here, at the edge, with a logged line naming it.
"""

from __future__ import annotations

import logging
import math
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from dlorch.core.errors import first_problem
from dlorch.core.protocol import Invalid

log = logging.getLogger("dlorch.agent")

M = TypeVar("M", bound=BaseModel)


def finite_numbers(values: dict[str, Any], what: str) -> dict[str, float]:
    """``values`` without its non-finite numbers (NaN from sampled data), each left out with a logged line."""
    out = {}
    for k, v in values.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            out[k] = float(v)
        else:
            log.warning("%s %s is %r, not a finite number: not reported", what, k, v)
    return out


def finite_json(value: Any, where: str) -> Any:
    """``value`` with each non-finite number (at any depth) replaced by null, each with a logged line."""
    if isinstance(value, float) and not math.isfinite(value):
        log.warning("%s is %r, not a finite number: reported as null", where, value)
        return None
    if isinstance(value, dict):
        return {k: finite_json(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_json(v, f"{where}[{i}]") for i, v in enumerate(value)]
    return value


def report(model: type[M], fields: dict[str, Any]) -> M:
    """A node's request as ``model``, its non-finite numbers (NaN from sampled data) left out with a logged line.

    Metrics and timings lose the entries that are not finite; elsewhere such a number becomes null. Raises
    Invalid (one line) if the request is still not one of the protocol's.
    """
    clean = {k: finite_numbers(v, k.rstrip("s")) if k in ("metrics", "timings") and isinstance(v, dict)
             else finite_json(v, k) for k, v in fields.items()}
    try:
        return model.model_validate(clean)
    except ValidationError as e:
        raise Invalid(f"invalid {model.__name__.lower()} report: {first_problem(e)}") from None

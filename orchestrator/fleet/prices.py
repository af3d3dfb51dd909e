"""The dated price table: $/h per instance type and market, GPU counts and throughput priors.

dlorch ships ``prices.json`` (us-east-1, dated by ``as_of``); a user overrides or extends it with a file of
the same shape named by ``DLORCH_PRICES=path`` or ``load_prices(prices_file=...)``. An override is merged
per type and per field, so ``{"types": {"local": {"static": 0.05}}}`` prices local agents and changes
nothing else. ``local`` and ``slurm`` cost 0 (market ``static``) unless overridden.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

from dlorch.core.errors import BadInput
from dlorch.orchestrator.fleet.model import Market

SHIPPED = Path(__file__).with_name("prices.json")
_MARKET_KEYS = {"on_demand": Market.ON_DEMAND, "spot": Market.SPOT, "static": Market.STATIC}
_FIELDS = {*_MARKET_KEYS, "gpus", "gpu", "vcpus", "throughput", "spot_ceiling"}
_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")


@dataclass(frozen=True)
class TypeInfo:
    """One instance type: its prices per market, GPUs and the throughput assumed until measured."""

    name: str
    prices: dict[str, float]  # market value ("spot", "on-demand", "static") -> expected $/h
    gpus: int | None  # None: not stated (the policy then lets it take GPU work)
    gpu: str | None
    throughput: float  # prior work units per hour (1.0 = one NVIDIA T4)
    spot_ceiling: float | None = None  # MaxPrice for spot; None: the on-demand price (AWS's default)


@dataclass(frozen=True)
class Prices:
    """A loaded price table. ``table[(type, market)]`` is the expected $/h."""

    as_of: str
    source: str
    billing_min_s: float
    types: dict[str, TypeInfo]

    @property
    def table(self) -> dict[tuple[str, str], float]:
        return {(t.name, m): p for t in self.types.values() for m, p in t.prices.items()}

    def ceiling(self, type_: str, market: Market | str) -> float:
        """The most ``type_`` can bill per hour on ``market``: spot's MaxPrice, the list price otherwise.

        Raises:
            BadInput: the table has no price for that type and market.
        """
        market = Market(market).value
        info = self.types.get(type_)
        if info is None or market not in info.prices:
            raise BadInput(f"no {market} price for instance type {type_!r} in the price table ({self.as_of}); "
                           "add it with a prices file (DLORCH_PRICES=path) or pick another type")
        if market == Market.SPOT.value:
            if info.spot_ceiling is not None:
                return info.spot_ceiling
            return info.prices.get(Market.ON_DEMAND.value, info.prices[market])
        return info.prices[market]

    @property
    def ceilings(self) -> dict[tuple[str, str], float]:
        return {(t.name, m): self.ceiling(t.name, m) for t in self.types.values() for m in t.prices}

    @property
    def gpus(self) -> dict[str, int]:
        return {t.name: t.gpus for t in self.types.values() if t.gpus is not None}

    @property
    def priors(self) -> dict[str, float]:
        return {t.name: t.throughput for t in self.types.values()}


def load_prices(prices_file: str | os.PathLike | None = None, env: dict | None = None) -> Prices:
    """The shipped table, merged with ``prices_file`` (or ``DLORCH_PRICES``) when given.

    Raises:
        BadInput: the override file is missing, not JSON, or a field has the wrong type (one line).
    """
    env = os.environ if env is None else env
    raw = _read(SHIPPED)
    override = prices_file or env.get("DLORCH_PRICES") or None
    if override:
        raw = _merge(raw, _read(Path(override)))
        return _parse(raw, str(override))
    return _parse(raw, str(SHIPPED))


def _read(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise BadInput(f"prices file {path} not found; give an existing JSON file (DLORCH_PRICES=path)") from None
    except (OSError, UnicodeDecodeError) as e:
        raise BadInput(f"prices file {path} cannot be read ({type(e).__name__}); check its permissions") from None
    except json.JSONDecodeError as e:
        raise BadInput(f"prices file {path} is not JSON (line {e.lineno}: {e.msg}); fix the file") from None
    if not isinstance(data, dict):
        raise BadInput(f"prices file {path} must hold a JSON object with \"as_of\" and \"types\"")
    return data


def _merge(base: dict, over: dict) -> dict:
    merged = {**base, **{k: v for k, v in over.items() if k != "types"}}
    types = dict(base.get("types", {}))
    over_types = over.get("types", {})
    if isinstance(over_types, dict):
        for name, entry in over_types.items():
            old = types.get(name, {})
            types[name] = {**old, **entry} if isinstance(entry, dict) and isinstance(old, dict) else entry
    else:
        types = over_types  # let _parse name the problem
    merged["types"] = types
    return merged


def _parse(raw: dict, where: str) -> Prices:
    as_of = raw.get("as_of")
    if not isinstance(as_of, str) or not _DATE.match(as_of):
        raise BadInput(f"prices file {where}: \"as_of\" must be a date like \"2026-12-01\", got {as_of!r}")
    billing_min_s = _number(raw.get("billing_min_s", 60), f"{where}: billing_min_s")
    types_raw = raw.get("types")
    if not isinstance(types_raw, dict) or not types_raw:
        raise BadInput(f"prices file {where}: \"types\" must be an object of instance types, e.g. "
                       "{\"g5.xlarge\": {\"on_demand\": 1.006}}")
    types = {}
    for name, entry in types_raw.items():
        at = f"{where}: types.{name}"
        if not isinstance(entry, dict):
            raise BadInput(f"prices file {at} must be an object like {{\"on_demand\": 1.006, \"spot\": 0.4}}")
        unknown = sorted(set(entry) - _FIELDS)
        if unknown:
            raise BadInput(f"prices file {at}: unknown field {unknown[0]!r}; known: {', '.join(sorted(_FIELDS))}")
        prices = {m.value: _number(entry[k], f"{at}.{k}") for k, m in _MARKET_KEYS.items()
                  if entry.get(k) is not None}
        if not prices:
            raise BadInput(f"prices file {at} has no price; give \"on_demand\", \"spot\" or \"static\" in $/h")
        gpus = entry.get("gpus")
        if gpus is not None and (isinstance(gpus, bool) or not isinstance(gpus, int) or gpus < 0):
            raise BadInput(f"prices file {at}.gpus must be a whole number >= 0, got {gpus!r}")
        gpu = entry.get("gpu")
        if gpu is not None and not isinstance(gpu, str):
            raise BadInput(f"prices file {at}.gpu must be a GPU name or null, got {gpu!r}")
        throughput = _number(entry.get("throughput", 1.0), f"{at}.throughput")
        if throughput <= 0:
            raise BadInput(f"prices file {at}.throughput must be > 0 work units per hour, got {throughput}")
        ceiling = entry.get("spot_ceiling")
        ceiling = None if ceiling is None else _number(ceiling, f"{at}.spot_ceiling")
        types[name] = TypeInfo(name, prices, gpus, gpu, throughput, ceiling)
    return Prices(as_of=as_of, source=str(raw.get("source", "")), billing_min_s=billing_min_s, types=types)


def _number(value, at: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise BadInput(f"prices file {at} must be a non-negative number, got {value!r}")
    return float(value)

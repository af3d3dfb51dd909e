"""The fleet's scale config in the ledger: what ``dlorch scale`` sets and the running controller reads each tick.

One record, ``fleet/config``: the policy's ``ScaleConfig`` fields and where to launch (provider, EC2 region
and launch template, Slurm script). It is checked when written, so a bad value is one line at the command
and never a surprise in the running orchestrator; a paid provider (EC2) without a cost cap is refused.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field

from dlorch.core.errors import BadInput
from dlorch.orchestrator.fleet.model import ScaleConfig

KEY = "fleet/config"
PROVIDERS = ("local", "ec2", "slurm")
PAID = ("ec2",)  # providers whose machines cost money: they need a cap
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$")
_UNIT_S = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


@dataclass(frozen=True)
class FleetConfig:
    """The scale policy and the provider settings it launches with."""

    scale: ScaleConfig = field(default_factory=ScaleConfig)
    region: str | None = None  # ec2
    launch_template: str | None = None  # ec2: the launch template's name (infra/ creates it)
    subnets: tuple[str, ...] = ()  # ec2: subnets to launch into, one per zone
    slurm_script: str | None = None  # slurm: the agent's batch script
    partition: str | None = None  # slurm

    @property
    def active(self) -> bool:
        """Whether the controller has anything to do: nodes may be launched."""
        return self.scale.max_nodes > 0 or self.scale.min_nodes > 0

    def to_json(self) -> dict:
        scale = dataclasses.asdict(self.scale)
        for k, v in scale.items():
            if isinstance(v, tuple):
                scale[k] = list(v)
        return {"scale": scale, "region": self.region, "launch_template": self.launch_template,
                "subnets": list(self.subnets), "slurm_script": self.slurm_script, "partition": self.partition}

    @classmethod
    def from_json(cls, data: dict) -> "FleetConfig":
        """The config from its record; unknown fields (from a newer version) are ignored, bad ones are an error."""
        if not isinstance(data, dict):
            raise BadInput(f"the scale config in the ledger ({KEY}) is not an object; set it again with `dlorch scale`")
        known = {f.name: f for f in dataclasses.fields(ScaleConfig)}
        raw = data.get("scale") or {}
        kw = {}
        for k, v in raw.items():
            if k in known:
                kw[k] = tuple(v) if isinstance(v, list) else v
        try:
            scale = ScaleConfig(**kw)
        except TypeError as e:
            raise BadInput(f"the scale config in the ledger ({KEY}) is unreadable ({e}); set it again with "
                           "`dlorch scale`") from None
        return cls(scale=scale, region=data.get("region"), launch_template=data.get("launch_template"),
                   subnets=tuple(data.get("subnets") or ()), slurm_script=data.get("slurm_script"),
                   partition=data.get("partition"))


def parse_duration(text: str, what: str) -> float:
    """Seconds from ``90``, ``90s``, ``30m``, ``12h`` or ``1d``; BadInput naming ``what`` otherwise."""
    m = _DURATION.match(str(text))
    if not m or float(m.group(1)) <= 0:
        raise BadInput(f"{what} {text!r} is not a duration; write e.g. 90s, 30m, 12h or 1d")
    return float(m.group(1)) * _UNIT_S[m.group(2)]


def format_duration(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:g}{unit}"
    return f"{seconds:g}s"


def check(config: FleetConfig, known_types: set[str] | None = None) -> FleetConfig:
    """``config`` if it is usable, else BadInput with one line naming the problem and the fix."""
    s = config.scale
    if s.provider not in PROVIDERS:
        raise BadInput(f"unknown provider {s.provider!r}; choose {', '.join(PROVIDERS)}")
    if s.min_nodes < 0 or s.max_nodes < 0:
        raise BadInput("--min and --max are numbers of nodes, 0 or more")
    if s.min_nodes > s.max_nodes:
        raise BadInput(f"--min {s.min_nodes} is above --max {s.max_nodes}; raise --max or lower --min")
    if s.cap_usd is not None and (not math.isfinite(s.cap_usd) or s.cap_usd < 0):
        raise BadInput(f"--cap-usd {s.cap_usd} must be a non-negative amount of US dollars")
    if s.provider in PAID and s.cap_usd is None and s.max_nodes > 0:
        raise BadInput(f"the {s.provider} provider costs money: give a hard cap with --cap-usd AMOUNT (per "
                       "--cap-period, 1d by default)")
    for name in ("cap_period_s", "idle_s", "tick_s"):
        v = getattr(s, name)
        if not math.isfinite(v) or v <= 0:
            raise BadInput(f"{name} must be a positive duration, got {v}")
    if known_types is not None:
        for t in s.instance_types:
            if t not in known_types:
                raise BadInput(f"instance type {t!r} is not in the price table; choose from "
                               f"{', '.join(sorted(known_types))} or add it with DLORCH_PRICES=file")
    if s.provider == "ec2" and s.max_nodes > 0:
        if not config.launch_template:
            raise BadInput("the ec2 provider launches from a launch template: give --launch-template NAME "
                           "(infra/ creates one)")
        if not config.region:
            raise BadInput("the ec2 provider needs --region (e.g. us-east-1)")
    if s.provider == "slurm" and s.max_nodes > 0 and not config.slurm_script:
        raise BadInput("the slurm provider submits an agent batch script: give --slurm-script PATH")
    return config


def load(ledger) -> FleetConfig:
    """The config the ledger holds, or the default (local provider, no nodes launched)."""
    record = ledger.record(KEY)
    return FleetConfig() if record is None else FleetConfig.from_json(record)


def save(ledger, config: FleetConfig) -> None:
    """Write the config (checked first); compare-and-set, so a concurrent write is never torn."""
    ledger.put_record(KEY, check(config).to_json(), fenced=False)


def update(config: FleetConfig, **changes) -> FleetConfig:
    """``config`` with the given fields changed (scale fields and provider fields by name); None: unchanged."""
    scale_fields = {f.name for f in dataclasses.fields(ScaleConfig)}
    scale_kw = {k: v for k, v in changes.items() if k in scale_fields and v is not None}
    top_kw = {k: v for k, v in changes.items() if k not in scale_fields and v is not None}
    return dataclasses.replace(config, scale=dataclasses.replace(config.scale, **scale_kw), **top_kw)

"""The fleet's vocabulary, shared by the autoscaling policy (policy.py, pure), the compute providers
(local.py, ec2.py, slurm.py: IO) and the controller that joins them to the orchestrator (controller.py).

The policy reads a ``Snapshot`` and returns ``Action``s; the controller carries them out through a
``Provider`` and records what it did (instances, billing) in the ledger. Times are the orchestrator's
clock in epoch seconds; prices are US dollars per hour.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Protocol


class Market(str, Enum):
    SPOT = "spot"
    ON_DEMAND = "on-demand"
    STATIC = "static"  # a machine dlorch did not launch and does not pay for: lab PC, Slurm allocation, local


class InstanceState(str, Enum):
    PENDING = "pending"  # launched (or submitted), not yet running
    RUNNING = "running"
    STOPPING = "stopping"  # termination asked, may still bill
    TERMINATED = "terminated"


@dataclass(frozen=True)
class LaunchRequest:
    """One machine to start. ``node_id`` is the dlorch node id its agent will register under."""

    type: str  # instance type ("g5.xlarge"), "local", or a Slurm partition
    market: Market
    price_ceiling_usd_h: float  # spot: the MaxPrice given to the provider; on-demand: the list price
    node_id: str
    zone: str | None = None


@dataclass(frozen=True)
class Instance:
    """A machine as its provider lists it."""

    id: str  # the provider's id: "i-0abc…", "local-<pid>", a Slurm job id
    provider: str  # "local", "ec2", "slurm"
    type: str
    market: Market
    price_ceiling_usd_h: float  # the most it can bill per hour
    state: InstanceState
    launched_at: float  # billing start
    node_id: str | None = None  # the dlorch node id it was launched for (from its tag / job name)
    zone: str | None = None
    price_usd_h: float | None = None  # what it bills per hour, where the provider reports it (spot price)
    price_since: float | None = None  # when that price took effect (None: unknown)
    price_as_of: float | None = None  # when it was read (None: now)


class ProviderError(Exception):
    """A provider refused or failed a call; the subclasses say whether another type or zone may work."""


class CapacityError(ProviderError):
    """No capacity for this type/zone/market now (EC2 InsufficientInstanceCapacity, spot unavailable)."""


class QuotaError(ProviderError):
    """An account limit (vCPU quota, instance limit) forbids the launch."""


class ThrottledError(ProviderError):
    """The provider's API rate limit: retry later, another type will not help."""


class Provider(Protocol):
    """A compute backend. ``list`` returns this deployment's instances (by tag / job name), not terminated."""

    name: str

    def launch(self, request: LaunchRequest) -> Instance: ...

    def terminate(self, instance_ids: list[str]) -> None: ...

    def list(self) -> list[Instance]: ...

    # optional: ``ended(instance_ids) -> {id: epoch seconds}``, when instances no longer listed stopped
    # billing, as the provider reports it (ids it cannot date are left out; the controller then ends their
    # billing at the tick that found them gone)


@dataclass(frozen=True)
class QueuedWork:
    """A job waiting in the queue, as the policy sees it."""

    job_id: str
    kind: str  # "train", "segment", "denoise", "predict", "block" …
    gpu: bool  # wants a GPU
    priority: int
    queued_at: float
    # held under a lease whose node is gone or no longer reports it: back in the queue when the lease lapses
    # (after an orchestrator restart, for up to one lease). It keeps idle and booting capacity, launches none.
    awaiting_requeue: bool = False


@dataclass(frozen=True)
class NodeView:
    """A registered node agent (launched by dlorch or static) as the policy sees it."""

    node_id: str
    instance_id: str | None  # None for a static agent (lab PC, hand-started, Slurm not launched by dlorch)
    busy: bool
    idle_since: float | None  # when it last became idle; None while busy
    draining: bool = False
    gpu: bool = False


@dataclass(frozen=True)
class LaunchFailure:
    type: str
    zone: str | None
    market: Market
    at: float
    kind: str  # "capacity", "quota", "throttled", "never-registered"


@dataclass(frozen=True)
class ScaleConfig:
    """What the user set with ``dlorch scale``."""

    provider: str = "local"  # "local", "ec2", "slurm"
    min_nodes: int = 0
    max_nodes: int = 0
    cap_usd: float | None = None  # hard cap on spend per cap period; None: no cap (only for free providers)
    cap_period_s: float = 86_400.0
    instance_types: tuple[str, ...] = ()
    spot: bool = True
    idle_s: float = 300.0
    billing_min_s: float = 60.0  # EC2 Linux bills per second with a 60 s minimum
    billing_granularity_s: float = 1.0
    tick_s: float = 10.0  # control period of the controller
    termination_latency_s: float = 120.0  # from terminate to billing stop, worst case
    register_timeout_s: float = 600.0  # a launched instance whose agent has not registered by then is a leak
    max_launch_per_tick: int = 4  # bounded upscaling speed
    spot_failures_before_on_demand: int = 3  # K
    spot_wait_before_on_demand_s: float = 600.0  # T
    avoid_s: float = 1800.0  # how long a type that failed is avoided
    capacity_avoid_s: float = 300.0  # how long a type/zone/market that had no capacity is avoided
    zones: tuple[str, ...] = ()  # zones to try in turn after a capacity failure; empty: the provider's choice


@dataclass(frozen=True)
class Snapshot:
    """Everything ``policy.step`` may look at; built by the controller from the ledger, queue and provider."""

    config: ScaleConfig
    queue: tuple[QueuedWork, ...]
    instances: tuple[Instance, ...]  # the provider's list, this deployment only
    known: frozenset[str]  # instance ids the ledger recorded as launched by this deployment
    nodes: tuple[NodeView, ...]
    prices: dict[tuple[str, str], float]  # (type, market) -> expected $/h (the dated price table)
    throughput: dict[str, float]  # type -> measured work units per hour (absent: the policy's prior)
    spent_usd: float  # billed in the current cap period, at billing granularity
    period_start: float
    failures: tuple[LaunchFailure, ...] = ()
    # from the price table (prices.Prices.ceilings / .gpus / .priors); absent entries fall back safely:
    # a spot ceiling to the on-demand price, an unknown GPU count to "has a GPU", a prior to 1.0 unit/h
    ceilings: dict[tuple[str, str], float] = field(default_factory=dict)  # (type, market) -> most $/h
    gpus: dict[str, int] = field(default_factory=dict)  # type -> GPU count
    priors: dict[str, float] = field(default_factory=dict)  # type -> assumed work units/h until measured


@dataclass(frozen=True)
class Launch:
    request: LaunchRequest
    reserve_usd: float  # the worst case this launch may bill, counted against the cap before it happens
    reason: str = ""


@dataclass(frozen=True)
class Terminate:
    instance_id: str
    reason: str = ""


@dataclass(frozen=True)
class Drain:
    node_id: str
    reason: str = ""


Action = Launch | Terminate | Drain


@dataclass
class Decision:
    """``policy.step``'s result: the actions and, for the record, why."""

    actions: list[Action] = field(default_factory=list)
    reserved_usd: float = 0.0  # worst case of all live and pending instances after the actions
    notes: list[str] = field(default_factory=list)

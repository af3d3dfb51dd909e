"""The job model: what a user asks for (JobSpec), what the ledger records (Job, Attempt, Node).

Job states and the legal moves between them (the orchestrator enforces them, compare-and-set)::

    QUEUED ──claim──▶ RUNNING ──result──▶ SUCCEEDED
      ▲                 │  │  └──split into blocks──▶ WAITING ──all blocks done──▶ SUCCEEDED
      └──hand back / ───┘  └──error, attempts left: QUEUED; none left──▶ FAILED
         lease expired
    QUEUED, RUNNING or WAITING ──cancel──▶ CANCELLED
"""

from __future__ import annotations

import re
import time
import uuid
from enum import Enum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from dlorch.core.errors import BadInput


class JobStatus(str, Enum):
    """Where a job stands. Only the orchestrator moves a job between these."""

    QUEUED = "queued"  # waiting in the queue for a node; holds the token of its next attempt
    RUNNING = "running"  # a node holds it under a lease it renews by heartbeat
    WAITING = "waiting"  # split into blocks that nodes pull from the orchestrator; ends when all are done
    SUCCEEDED = "succeeded"  # result accepted from the lease holder; terminal
    FAILED = "failed"  # gave up after max_attempts, or the input can never work; terminal
    CANCELLED = "cancelled"  # stopped by the user; terminal

    def is_terminal(self) -> bool:
        """True when the job will never run again."""
        return self in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED)


TRANSITIONS: dict[JobStatus, set[JobStatus]] = {
    JobStatus.QUEUED: {JobStatus.RUNNING, JobStatus.CANCELLED, JobStatus.FAILED},
    JobStatus.RUNNING: {JobStatus.QUEUED, JobStatus.WAITING, JobStatus.SUCCEEDED, JobStatus.FAILED,
                        JobStatus.CANCELLED},
    JobStatus.WAITING: {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED},
    JobStatus.SUCCEEDED: set(),
    JobStatus.FAILED: set(),
    JobStatus.CANCELLED: set(),
}


class AttemptOutcome(str, Enum):
    """How one attempt ended."""

    RUNNING = "running"  # still under lease
    SUCCEEDED = "succeeded"  # produced the job's result
    SPLIT = "split"  # planned a blockwise job: its blocks are handed out by the orchestrator now
    HANDED_BACK = "handed_back"  # the node stopped (signal, drain, spot notice) and returned the rest
    EXPIRED = "expired"  # the lease ran out: the node vanished or stalled
    ERRORED = "errored"  # the job raised on the node
    CANCELLED = "cancelled"  # the user cancelled while it ran


MAX_EPOCHS = 100_000
CURVE_POINTS = 200  # the most epochs a job's curve keeps: its record stays small however long training runs
MIN_PRIORITY, MAX_PRIORITY = -100, 100

# The zoo's candidate variants (core/engine/zoo.py, whose VARIANTS a test keeps equal to this),
# named here so that a spec is checked without importing the engine.
MODEL_VARIANTS = ("unet-deep", "unet-shallow-wide", "ce-only", "wide-context", "other-geometry")


def _check_options(spec: "JobSpec") -> None:
    """Engine options a job of this kind uses, with their types; anything else is an error here, at
    submission, instead of being ignored (a typo) or failing on a node."""
    opts = spec.options
    allowed = set()
    if spec.task == "segmentation" and spec.kind in ("segment", "train"):
        allowed |= {"variant", "init_from", "accepted", "accepted_weight"}
    if spec.task == "segmentation" and spec.kind in ("segment", "predict"):
        allowed |= {"tta", "confidence"}
    if spec.kind == "predict":
        allowed |= {"block_voxels", "write_ome_zarr"}  # write_ome_zarr: blockwise into an OME-Zarr
    for key in opts:
        if key not in allowed:
            raise BadInput(f"invalid job spec: field 'options.{key}': a {spec.task} {spec.kind} job takes "
                           f"{', '.join(sorted(allowed)) or 'no options'}")
    if "variant" in opts and opts["variant"] not in MODEL_VARIANTS:
        raise BadInput(f"invalid job spec: field 'options.variant': {opts['variant']!r} is not a model variant; "
                       f"choose one of {', '.join(MODEL_VARIANTS)}")
    if "write_ome_zarr" in opts and not isinstance(opts["write_ome_zarr"], bool):
        raise BadInput("invalid job spec: field 'options.write_ome_zarr': true or false")
    if "tta" in opts and not isinstance(opts["tta"], bool) and opts["tta"] is not None:
        raise BadInput("invalid job spec: field 'options.tta': true, false or null (the plan decides)")
    for key in ("init_from", "accepted"):  # a model (job id or checkpoint URI), a label map's URI
        if key in opts and (not isinstance(opts[key], str) or not 0 < len(opts[key]) <= 4096):
            raise BadInput(f"invalid job spec: field 'options.{key}': a non-empty "
                           f"{'model reference' if key == 'init_from' else 'label map URI'} (at most 4096 characters)")
    if "accepted_weight" in opts:
        w = opts["accepted_weight"]
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not 0 < w <= 1:
            raise BadInput("invalid job spec: field 'options.accepted_weight': a number in (0, 1], the loss weight "
                           "of accepted pixels relative to painted ones")
        if "accepted" not in opts:
            raise BadInput("invalid job spec: field 'options.accepted_weight': weighs accepted labels; give "
                           "options.accepted too (--accepted LABELS)")
    if "confidence" in opts and not isinstance(opts["confidence"], bool):
        raise BadInput("invalid job spec: field 'options.confidence': true or false")
    if opts.get("confidence") and spec.blockwise:
        raise BadInput("invalid job spec: field 'options.confidence': a confidence map is written for whole images; "
                       "predict into .tif or .npy, or leave confidence out")
    if "block_voxels" in opts and (isinstance(opts["block_voxels"], bool) or not isinstance(opts["block_voxels"], int)
                                   or not 1 <= opts["block_voxels"] <= 2**40):
        raise BadInput("invalid job spec: field 'options.block_voxels': a whole number of voxels from 1 to 2**40")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class JobSpec(_Strict):
    """What a user asks for. Unknown fields are an error, so a typo never silently does nothing."""

    kind: Literal["segment", "denoise", "train", "predict"] = Field(
        description="segment / denoise = train then predict the same image; train = model only; predict = apply a"
        " model (a .zarr volume into .zarr is cut into blocks that many nodes share)"
    )
    task: Literal["segmentation", "denoising"] = "segmentation"
    target: str | None = Field(None, description="denoising: a second noisy acquisition (n2n) or a clean image (care)")
    mode: Literal["n2v", "n2n", "care"] | None = Field(None, description="denoising scheme; automatic by default")
    image: str = Field(description="store URI of the input image (TIFF, zarr, .npy/.npz)")
    labels: str | None = Field(None, description="store URI of sparse labels (0 = unlabelled, 1..K)")
    model: str | None = Field(None, description="store URI of a model checkpoint (predict)")
    output_format: Literal["tif", "zarr", "npy"] = "tif"
    output: str | None = Field(None, description="where a blockwise prediction writes its zarr (URL); default: the store")
    epochs: int | None = Field(None, ge=1, le=MAX_EPOCHS, description="override of the automatic epoch count")
    time_budget: float | None = Field(None, gt=0, allow_inf_nan=False, description="cap on training seconds")
    options: dict[str, Any] = Field(default_factory=dict, description="engine options (e.g. network variant)")
    priority: int = Field(0, ge=MIN_PRIORITY, le=MAX_PRIORITY, description="higher runs first; FIFO within a priority")
    max_attempts: int | None = Field(None, ge=1, le=100)
    name: str | None = None

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    def check(self) -> "JobSpec":
        """Cross-field rules: training needs labels, prediction needs a model."""
        if self.kind == "denoise" and self.task != "denoising":
            raise BadInput("invalid job spec: field 'task': a denoise job has task 'denoising'")
        if self.task == "segmentation" and self.kind in ("segment", "train") and not self.labels:
            raise BadInput(f"invalid job spec: field 'labels': a {self.kind} job needs --labels LABELS")
        if self.kind == "predict" and not self.model:
            raise BadInput("invalid job spec: field 'model': a predict job needs MODEL (a job id or model URI)")
        _check_options(self)
        return self

    @property
    def blockwise(self) -> bool:
        """A prediction (segmentation or denoising) of a zarr volume into zarr, cut into blocks that
        nodes run in parallel, each reading and writing only its own part: memory-bounded, so a
        volume larger than any node's RAM goes through."""
        return self.kind == "predict" and self.output_format == "zarr" and self.image.rstrip("/").endswith(".zarr")

    @property
    def trains(self) -> bool:
        """True for jobs that train (and so have epochs and checkpoints)."""
        return self.kind in ("segment", "denoise", "train")


def parse_spec(data: dict[str, Any] | str) -> JobSpec:
    """Validate a spec from a dict or JSON text; errors become one line naming the field."""
    try:
        if isinstance(data, str):
            spec = JobSpec.model_validate_json(data)
        else:
            spec = JobSpec.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        field = ".".join(str(p) for p in err["loc"]) or "(spec)"
        raise BadInput(f"invalid job spec: field '{field}': {err['msg']}") from None
    return spec.check()


class Attempt(_Strict):
    """One try at a job by one node. ``token`` is the fencing token: strictly increasing per job."""

    token: int
    node: str | None = None
    started_at: float | None = None
    ended_at: float | None = None
    lease_expires_at: float | None = None
    outcome: AttemptOutcome = AttemptOutcome.RUNNING
    epochs_start: int = 0
    epochs_done: int = 0
    resumed_from: str | None = None
    error: str | None = None
    timings: dict[str, float] = Field(default_factory=dict)


class Job(_Strict):
    """The ledger's record of a job: its spec, status, attempts and progress."""

    id: str
    spec: JobSpec
    status: JobStatus = JobStatus.QUEUED
    created_at: float
    updated_at: float
    next_token: int = 1  # token of the attempt the queued message carries
    attempts: list[Attempt] = Field(default_factory=list)
    epochs_done: int = 0
    epochs_total: int | None = None
    checkpoint: str | None = None  # last accepted checkpoint, from the lease holder only
    checkpoints: list[tuple[int, str]] = Field(default_factory=list)  # recent (epochs, uri), oldest first
    model: str | None = None  # final model checkpoint (training jobs)
    output: str | None = None  # result image (segment / predict)
    confidence: str | None = None  # uint8 per-pixel confidence beside the output (options.confidence)
    plan: dict[str, Any] | None = None  # the engine's automatic configuration and its reasons
    metrics: dict[str, float] = Field(default_factory=dict)
    curve: list[dict[str, float]] = Field(default_factory=list)  # per-epoch metrics ({"epoch": n, ...}), thinned
    error: str | None = None
    blocks: dict[str, Any] | None = None  # blockwise progress: total, done (and as ranges), per node, voxels, timings
    cancel_requested: bool = False
    events: list[tuple[float, str]] = Field(default_factory=list)

    @property
    def current(self) -> Attempt | None:
        """The attempt that holds (or last held) the job."""
        return self.attempts[-1] if self.attempts else None

    @property
    def node(self) -> str | None:
        """The node of the latest attempt."""
        return self.current.node if self.current else None

    def log(self, now: float, text: str) -> None:
        """Append a line to the job's event history (kept in the ledger, shown by ``dlorch logs``)."""
        self.events.append((now, text))

    def record_epoch(self, epochs_done: int, metrics: dict[str, float]) -> None:
        """Add an epoch's metrics to the curve (loss and held-out scores, for the dashboard).

        Only losses and held-out scores (``*loss``, ``val_*``) are kept. An epoch trained again after a
        resume replaces what was recorded from it on; past ``CURVE_POINTS`` every other point is dropped,
        so the curve keeps its whole span.
        """
        point = {k: v for k, v in metrics.items() if k.endswith("loss") or k.startswith("val_")}
        if not point:
            return
        curve = [p for p in self.curve if p.get("epoch", 0) < epochs_done]
        if len(curve) >= CURVE_POINTS:
            curve = curve[::2]
        self.curve = [*curve, {"epoch": float(epochs_done), **dict(list(point.items())[:8])}]

    def public(self) -> dict[str, Any]:
        """The JSON document of ``dlorch status --json`` / ``jobs --json`` (a stable contract)."""
        d = self.model_dump(mode="json")
        d["node"] = self.node
        d["attempts"] = [a.model_dump(mode="json") for a in self.attempts]
        return d


ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def check_id(kind: str, value: object) -> str:
    """``value`` if it is a safe job or node id (it becomes part of ledger keys and store paths), else BadInput.

    Ids are checked at the edge, so that ``../jobs/j-1`` as a node id or ``../../x`` as a job id can never
    name another record or a path outside the ledger.
    """
    if not isinstance(value, str) or not ID_PATTERN.fullmatch(value):
        raise BadInput(f"invalid {kind} id {str(value)[:80]!r}: use at most 128 letters, digits, '.', '_' or '-', "
                       "starting with a letter or digit")
    return value


def new_job_id(now: float | None = None) -> str:
    """A sortable, unique job id: ``j-YYYYmmdd-HHMMSS-xxxxxx``."""
    t = time.gmtime(now if now is not None else time.time())
    return "j-" + time.strftime("%Y%m%d-%H%M%S", t) + "-" + uuid.uuid4().hex[:6]


class NodeInfo(_Strict):
    """A node agent as it registered, and its last heartbeat."""

    id: str
    hostname: str
    pid: int
    cpus: int
    memory_bytes: int
    gpus: list[dict[str, Any]] = Field(default_factory=list)
    torch: str = ""
    precision: str = ""  # what its engine computes in: "32-true", "bf16-mixed", "16-mixed" (Lightning's names)
    platform: str = ""
    registered_at: float
    heartbeat_at: float
    job: str | None = None
    attempt: int | None = None
    drain: bool = False
    state: Literal["idle", "busy", "draining", "gone"] = "idle"

    def alive(self, now: float, lease_s: float) -> bool:
        """A node is alive while its heartbeat is younger than one lease."""
        return self.state != "gone" and now - self.heartbeat_at <= lease_s

    def public(self, now: float, lease_s: float) -> dict[str, Any]:
        """The JSON document of ``dlorch nodes --json``."""
        d = self.model_dump(mode="json")
        d["alive"] = self.alive(now, lease_s)
        return d

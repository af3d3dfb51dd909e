"""The wire protocol: every message that crosses the queue, as typed models, and how they are bound.

Two channels carry signed JSON (``core/wire.py``, ``orchestrator/queue.py``):

* ``jobs``: ``Dispatch`` messages from the orchestrator: "attempt ``token`` of ``job`` waits for a node"
  (``kind`` "blocks": "this blockwise job hands out blocks"). Agents take one and ``Claim`` it. A dispatch
  message may wait for hours and may be duplicated or replayed harmlessly: the claim is checked against the
  job's next token (fencing), so dispatch messages carry no send time.
* ``events``: requests from agents and clients to the orchestrator, the single writer. Each is an
  ``Envelope`` (request id, sender, send time, one-way or not) around one request (``Request``, chosen by its
  ``type``), flat in one JSON object. A request that is not one-way is answered by a reply model (``Reply``
  and its subclasses) under its request id.

Every field of a message is signed, and so are the bindings: the channel's name (``queue.Channel``), and for a
reply the request id it answers (``reply_to``); a message recorded on one channel or for one request is refused
on another. Anything that does not parse as one of these models gets ``{"ok": false, "reason": <one line>}``
and changes nothing.

Replays. The key is shared, so whoever holds it can sign anything; the envelope defends against those who can
only read and write the queue (a recorded message sent again, a backlog delivered late). The orchestrator
refuses a duplicate (sender and request id seen within ``FRESH_S``), a stale request (sent more than ``FRESH_S``
from its ``now``) and a superseded heartbeat (``orchestrator/replay.py``); its handlers add monotonic rules
(progress never moves back, a result counts only from the lease holder, under its own keys).

Clocks. Send times are in the orchestrator's clock, as the sender knows it: every reply carries the
orchestrator's ``now``, from which the sender's queue learns the offset to its own monotonic clock, and stamps
``monotonic() + offset`` (``orchestrator/queue.py``). A node whose wall clock is hours off, or is stepped while
it runs, therefore stamps correctly after its first reply. Its very first request is stamped with its own wall
clock; if that is off by more than ``FRESH_S`` the orchestrator refuses it as stale with ``resend`` and its
``now``, and the sender stamps again and sends at once. ``FRESH_S`` also bounds how late a delivered request
may be: one older than that was given up on by its sender, which has sent it again by then.
"""

from __future__ import annotations

import logging
import math
from typing import Annotated, Any, Literal, TypeVar, Union

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, Strict, StringConstraints, \
    TypeAdapter, ValidationError

from dlorch.core.errors import BadInput, first_problem
from dlorch.core.spec import ID_PATTERN, MAX_PRIORITY, MIN_PRIORITY, AttemptOutcome, Job, JobSpec, JobStatus

log = logging.getLogger("dlorch.protocol")

FRESH_S = 120.0  # how far a send time may lie from the orchestrator's now (generous: a backlog, a first stamp)
MAX_LIST = 1 << 20  # items of any list (a split of a large volume lists every block)
MAX_TEXT = 2000  # characters of an error line: longer ones are cut, not refused


# -- field types --------------------------------------------------------------------------------------
def _id(value: str) -> str:
    if not ID_PATTERN.fullmatch(value):
        raise ValueError("not an id: at most 128 letters, digits, '.', '_' or '-', starting with a letter or digit")
    return value


def _cut(value: Any) -> Any:
    return value[:MAX_TEXT] if isinstance(value, str) else value


def _reported(outcome: AttemptOutcome) -> AttemptOutcome:
    if outcome in (AttemptOutcome.RUNNING, AttemptOutcome.EXPIRED):
        raise ValueError(f"{outcome.value!r} is the orchestrator's to record, not a node's to report")
    return outcome


def _plain_json(value: Any, depth: int = 0) -> Any:
    """``value`` if it is JSON of finite numbers and at most 16 levels deep (a free-form field: plan, norm)."""
    if depth > 16:
        raise ValueError("nested more than 16 levels deep")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError("holds a number that is not finite")
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            raise ValueError("has a key that is not a string")
        for v in value.values():
            _plain_json(v, depth + 1)
    elif isinstance(value, list):
        for v in value:
            _plain_json(v, depth + 1)
    elif value is not None and not isinstance(value, (str, int, float, bool)):
        raise ValueError(f"holds a {type(value).__name__}, which JSON has not")
    return value


Id = Annotated[str, Strict(), AfterValidator(_id)]  # a job or node id: safe as a ledger key and a store path
Uri = Annotated[str, Strict(), StringConstraints(min_length=1, max_length=4096)]
Text = Annotated[str, BeforeValidator(_cut), Strict()]
Token = Annotated[int, Strict(), Field(ge=0, le=2**31)]
Index = Annotated[int, Strict(), Field(ge=0, le=2**40)]
Count = Annotated[int, Strict(), Field(ge=0, le=2**53)]
Finite = Annotated[float, Strict(), Field(allow_inf_nan=False)]
Flag = Annotated[bool, Strict()]
Name = Annotated[str, Strict(), StringConstraints(pattern=r"^[A-Za-z][A-Za-z0-9_.]{0,63}$")]
Numbers = Annotated[dict[Name, Finite], Field(max_length=256)]  # metrics, timings
JsonObject = Annotated[dict[str, Any], Strict(), AfterValidator(_plain_json), Field(max_length=4096)]
Extent = Annotated[list[Annotated[tuple[Index, Index], Strict(False)]], Field(min_length=1, max_length=4)]
Outcome = Annotated[AttemptOutcome, Strict(False), AfterValidator(_reported)]  # how a node's attempt ended


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=(), populate_by_name=True)


# -- the envelope -------------------------------------------------------------------------------------
class Envelope(_Model):
    """What binds a request to one sending: who, which request, when. Signed with the request."""

    rid: Annotated[str, Strict(), StringConstraints(pattern=r"^[0-9a-f]{16,64}$")]  # the request id
    sender: Id  # the node id of an agent, ``client-...`` for a client
    sent_at: Finite  # in the orchestrator's clock as the sender knows it (see "Clocks" above)
    oneway: Flag = False  # no reply wanted (block reports)


ENVELOPE_FIELDS = frozenset(Envelope.model_fields)

# Put on every reply by the orchestrator's queue path and taken off by the asker's queue (orchestrator/queue.py):
NOW = "now"  # the orchestrator's clock when it replied: the asker learns its offset from it
RESEND = "resend"  # true on a refusal for the send time: stamp again (with the offset just learnt) and resend


# -- requests -----------------------------------------------------------------------------------------
class Submit(_Model):
    """A client records a job (``job_id`` chosen by the client, so that a re-sent submit is the same job)."""

    type: Literal["submit"] = "submit"
    spec: JobSpec
    job_id: Id | None = None


class Cancel(_Model):
    """A client cancels a job (its id, or a unique prefix or suffix of it)."""

    type: Literal["cancel"] = "cancel"
    job: Id


class Drain(_Model):
    """A client asks a node (its id or a unique prefix) to hand its job back and leave."""

    type: Literal["drain"] = "drain"
    node: Id


class NodeRequest(_Model):
    """A request a node sends about itself: ``node`` must be the envelope's sender."""

    node: Id


class NodeAnnouncement(_Model):
    """A node's hardware as it registers (``spec.NodeInfo`` without what the orchestrator keeps)."""

    id: Id
    hostname: Annotated[str, Strict(), StringConstraints(max_length=255)]
    pid: Count
    cpus: Count
    memory_bytes: Count
    gpus: Annotated[list[JsonObject], Field(max_length=64)] = []
    torch: Annotated[str, Strict(), StringConstraints(max_length=64)] = ""
    precision: Annotated[str, Strict(), StringConstraints(max_length=32)] = ""
    platform: Annotated[str, Strict(), StringConstraints(max_length=128)] = ""


class Register(_Model):
    """A node joins (or joins again: a new registration clears an old drain)."""

    type: Literal["register"] = "register"
    node_info: NodeAnnouncement

    @property
    def node(self) -> str:
        return self.node_info.id


class Heartbeat(NodeRequest):
    """A node is alive; it renews the lease of its attempt (``job``, ``token``) and of the blocks it holds."""

    type: Literal["heartbeat"] = "heartbeat"
    job: Id | None = None
    token: Token | None = None
    blocks: Annotated[list[Annotated[tuple[Id, Index], Strict(False)]], Field(max_length=4096)] = []


class Bye(NodeRequest):
    """A node leaves."""

    type: Literal["bye"] = "bye"


class AttemptRequest(NodeRequest):
    """A request about attempt ``token`` of ``job``, accepted only from the node holding its lease."""

    job: Id
    token: Token


class Claim(AttemptRequest):
    """A node takes attempt ``token`` of ``job``, whose dispatch message it received."""

    type: Literal["claim"] = "claim"


class AttemptReport(AttemptRequest):
    """What the lease holder reports of its training: a checkpoint (under its own keys), the plan, metrics."""

    checkpoint: Uri | None = None
    epochs_total: Count | None = None
    plan: JsonObject | None = None
    metrics: Numbers = {}


class Progress(AttemptReport):
    """The lease holder checkpointed an epoch, or fell back to an older checkpoint (``resumed_from``)."""

    type: Literal["progress"] = "progress"
    epochs_done: Count
    resumed_from: Annotated[str, Strict(), StringConstraints(max_length=4096)] | None = None  # "": none readable
    why: Text = ""


class BlockGeometry(_Model):
    """One block of a blockwise job: the core it writes and the region it reads, ``[start, stop)`` per axis."""

    index: Index
    core: Extent
    read: Extent


class Finish(AttemptReport):
    """The lease holder's attempt ended: its outcome and what it produced (a split lists the blocks)."""

    type: Literal["finish"] = "finish"
    outcome: Outcome
    epochs_done: Count | None = None
    model: Uri | None = None
    output: Uri | None = None
    confidence: Uri | None = None  # a segmentation's per-pixel confidence beside ``output`` (options.confidence)
    timings: Numbers = {}
    error: Text | None = None
    permanent: Flag = False  # the input can never work: no retry
    # A split (outcome "split"): the blocks, and what every block shares (Task.calibrate's fields).
    blocks: Annotated[list[BlockGeometry], Field(max_length=MAX_LIST)] | None = None
    voxels: Count = 0
    norm: JsonObject | None = None
    priors: Annotated[list[Finite], Field(max_length=256)] | None = None
    noise_var: Finite | None = None


class BlockReport(_Model):
    """A block done, reported with the node's next block request (``node``: the request's, whatever it says)."""

    job: Id
    block: Index
    timings: Numbers = {}
    node: Id | None = None


class NextBlock(NodeRequest):
    """A node asks for a block (of ``job`` first, near its last one, ``after``), reporting those it finished."""

    type: Literal["next_block"] = "next_block"
    job: Id | None = None
    after: Index | None = None
    models: Annotated[list[Uri], Field(max_length=64)] = []  # the model URIs the node holds (affinity)
    have: Annotated[list[Id], Field(max_length=64)] = []  # jobs whose context the node holds
    done: Annotated[list[BlockReport], Field(max_length=4096)] = []


class BlockDone(NodeRequest):
    type: Literal["block_done"] = "block_done"
    job: Id
    block: Index
    timings: Numbers = {}


class BlockFailed(NodeRequest):
    type: Literal["block_failed"] = "block_failed"
    job: Id
    block: Index
    error: Text = "unknown error"
    permanent: Flag = False
    timings: Numbers = {}


class BlockRelease(NodeRequest):
    """A stopping node hands a block back unfinished."""

    type: Literal["block_release"] = "block_release"
    job: Id
    block: Index


Request = Annotated[Union[Submit, Cancel, Drain, Register, Heartbeat, Bye, Claim, Progress, Finish, NextBlock,
                          BlockDone, BlockFailed, BlockRelease], Field(discriminator="type")]
_REQUEST: TypeAdapter = TypeAdapter(Request)
REQUEST_TYPES = frozenset(m.model_fields["type"].default for m in Request.__origin__.__args__)


# -- replies ------------------------------------------------------------------------------------------
class Reply(_Model):
    """Every reply: ``ok``, or not and why (one line). ``wire()`` leaves out the fields a handler did not set."""

    ok: Flag = True
    reason: Text | None = None

    def wire(self) -> dict[str, Any]:
        """The reply as JSON: ``ok`` and the fields set (nested models whole)."""
        fields = type(self).model_fields
        keep = {fields[name].alias or name for name in self.model_fields_set} | {"ok"}
        return {k: v for k, v in self.model_dump(mode="json", by_alias=True).items() if k in keep}


_R = TypeVar("_R", bound=Reply)


def refusal(reason: str) -> Reply:
    """A reply that refuses, with its reason on one line."""
    return Reply(ok=False, reason=" ".join(reason.split()))


class SubmitReply(Reply):
    job: Id | None = None


CancelReply = SubmitReply


class DrainReply(Reply):
    node: Id | None = None


class ClaimReply(Reply):
    job: Job | None = None
    lease_expires_at: Finite | None = None


class HeartbeatReply(Reply):
    drain: Flag = False  # the node is asked to hand back and leave
    lease: Flag | None = None  # whether the attempt's lease was renewed (None: the node named none)
    register_again: Flag = Field(False, alias="register")  # the orchestrator does not know the node
    jobs_gone: Annotated[list[Id], Field(max_length=4096)] = []  # blockwise jobs whose blocks are no more


class FinishReply(Reply):
    status: Annotated[JobStatus, Strict(False)] | None = None


class BlockContext(_Model):
    """What every block of a job shares: sent once to each node that works on it."""

    spec: JobSpec
    output: Uri | None = None
    norm: JsonObject | None = None
    priors: Annotated[list[Finite], Field(max_length=256)] | None = None
    noise_var: Finite | None = None
    split: Token | None = None  # the planner attempt whose output array the blocks write into


class NextBlockReply(Reply):
    job: Id | None = None
    block: BlockGeometry | None = None
    context: BlockContext | None = None


# -- the jobs channel ---------------------------------------------------------------------------------
class Dispatch(_Model):
    """An attempt waiting for a node (``kind`` "blocks": a blockwise job handing out blocks, ``token`` 0)."""

    job: Id
    token: Token
    kind: Literal["segment", "denoise", "train", "predict", "blocks"]
    priority: Annotated[int, Strict(), Field(ge=MIN_PRIORITY, le=MAX_PRIORITY)] = 0

    def wire(self) -> dict[str, Any]:
        """As JSON; a default priority is left out."""
        return self.model_dump(mode="json", exclude_defaults=True)


# -- parsing ------------------------------------------------------------------------------------------
class Invalid(BadInput):
    """A message that is none of the protocol's: its one-line reason."""


def parse_request(body: dict[str, Any]) -> Request:
    """The typed request in a message body (envelope fields removed), or Invalid with one line."""
    kind = body.get("type") if isinstance(body, dict) else None
    if not isinstance(kind, str) or kind not in REQUEST_TYPES:
        raise Invalid(f"unknown request {str(kind)[:40]!r}; dlorch sends {', '.join(sorted(REQUEST_TYPES))}")
    try:
        return _REQUEST.validate_python(body)
    except (ValidationError, RecursionError) as e:
        problem = first_problem(e).removeprefix(f"{kind}.")  # the location starts with the request's type
        raise Invalid(f"invalid {kind} request: {problem}") from None


def split_envelope(message: dict[str, Any]) -> tuple[Envelope, dict[str, Any]]:
    """A queued request's envelope and body, or Invalid with one line."""
    try:
        envelope = Envelope.model_validate({k: v for k, v in message.items() if k in ENVELOPE_FIELDS})
    except ValidationError as e:
        raise Invalid(f"invalid envelope: {first_problem(e)}") from None
    return envelope, {k: v for k, v in message.items() if k not in ENVELOPE_FIELDS}


def parse_reply(model: type[_R], raw: dict[str, Any]) -> _R:
    """A reply as ``model``; one that does not parse is logged and becomes a refusal (never an exception)."""
    try:
        return model.model_validate(raw)
    except ValidationError as e:
        log.warning("dropped a malformed %s: %s", model.__name__, first_problem(e))
        return model(ok=False, reason=f"malformed reply ({first_problem(e)})")


def parse_dispatch(raw: dict[str, Any], quiet: bool = False) -> Dispatch | None:
    """A dispatch message, or None for one that is not (logged unless ``quiet``)."""
    try:
        return Dispatch.model_validate(raw)
    except ValidationError as e:
        if not quiet:
            log.warning("dropped a malformed dispatch message: %s", first_problem(e))
        return None

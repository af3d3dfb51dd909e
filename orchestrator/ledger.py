"""The ledger: the durable truth about jobs, attempts, nodes and the orchestrator's leadership.

Every status change is compare-and-set: read a record with its etag, check the status is one the
caller expects, check the move is legal (``spec.TRANSITIONS``), write only if the etag still matches.
"""

from __future__ import annotations

import json
import logging
from typing import Callable, Iterable, TypeVar

from pydantic import BaseModel, ValidationError

from dlorch.core.errors import BadInput, StaleWrite, first_problem
from dlorch.core.spec import TRANSITIONS, Job, JobStatus, NodeInfo, check_id
from dlorch.orchestrator.statestore import StateStore

log = logging.getLogger("dlorch.orchestrator")
M = TypeVar("M", bound=BaseModel)


class Leader(BaseModel):
    """Who runs the orchestrator loop now; renewed like a lease."""

    id: str
    hostname: str
    pid: int
    started_at: float
    heartbeat_at: float


class Ledger:
    """Typed access to the state store."""

    def __init__(self, store: StateStore) -> None:
        self.store = store
        self._conditional_writes_checked = False

    # -- jobs ---------------------------------------------------------------------------------
    def create(self, job: Job) -> None:
        """Record a new job; fails if the id exists."""
        self.store.put(f"jobs/{check_id('job', job.id)}", _dump(job), if_none_match=True)

    def find(self, job_id: str) -> Job | None:
        """A job, or None if there is no such record."""
        got = self.store.get(f"jobs/{check_id('job', job_id)}")
        return self._parse(Job, f"jobs/{job_id}", got[0]) if got else None

    def read(self, job_id: str) -> tuple[Job, str]:
        """A job and its etag."""
        got = self.store.get(f"jobs/{check_id('job', job_id)}")
        if got is None:
            raise BadInput(f"no job {job_id!r}; `dlorch jobs` lists them")
        return self._parse(Job, f"jobs/{job_id}", got[0]), got[1]

    def get(self, job_id: str) -> Job:
        """A job by id, or by a unique suffix or prefix of its id."""
        return self.read(self.resolve(job_id))[0]

    def resolve(self, ref: str) -> str:
        """The full id of a job given its id or a unique prefix/suffix."""
        if self.store.get(f"jobs/{check_id('job', ref)}") is not None:
            return ref
        ids = [k.split("/", 1)[1] for k in self.store.list("jobs")]
        hits = [i for i in ids if i.endswith(ref) or i.startswith(ref)]
        if len(hits) == 1:
            return hits[0]
        if not hits:
            raise BadInput(f"no job {ref!r}; `dlorch jobs` lists them")
        raise BadInput(f"job {ref!r} is ambiguous ({len(hits)} match); give more of the id")

    def update(
        self,
        job_id: str,
        change: Callable[[Job], None],
        *,
        expect: Iterable[JobStatus] | None = None,
    ) -> Job:
        """Apply ``change`` to a job, compare-and-set.

        Raises:
            StaleWrite: the job is not in an expected status, the change is not a legal transition,
                or another writer changed the record meanwhile.
        """
        job, etag = self.read(job_id)
        before = job.status
        if expect is not None and before not in set(expect):
            raise StaleWrite(f"job {job_id} is {before.value}, expected {', '.join(s.value for s in expect)}")
        change(job)
        if job.status != before and job.status not in TRANSITIONS[before]:
            raise StaleWrite(f"job {job_id}: illegal transition {before.value} -> {job.status.value}")
        self.store.put(f"jobs/{job_id}", _dump(job), if_match=etag)
        return job

    def jobs(self, statuses: Iterable[JobStatus] | None = None) -> list[Job]:
        """All jobs (optionally of some statuses), oldest first."""
        wanted = set(statuses) if statuses is not None else None
        out = []
        for key in self.store.list("jobs"):
            got = self.store.get(key)
            job = self._parse_or_skip(Job, key, got[0]) if got else None
            if job is None:
                continue
            if wanted is None or job.status in wanted:
                out.append(job)
        return sorted(out, key=lambda j: (j.created_at, j.id))

    # -- reading records ----------------------------------------------------------------------------
    def _parse(self, model: type[M], key: str, data: bytes) -> M:
        """A record, or a one-line error naming it: a damaged file is reported, never overwritten."""
        try:
            return model.model_validate_json(data)
        except ValidationError as e:
            root = getattr(self.store, "root", None)
            where = f"{root}/{key}.json" if root is not None else key
            raise CorruptRecord(f"ledger record {where} is unreadable ({first_problem(e)}); restore it from a backup or move it "
                                "aside (dlorch leaves it as it is)") from None

    def _parse_or_skip(self, model: type[M], key: str, data: bytes) -> M | None:
        """``_parse``, but a damaged record is logged once and left out of listings."""
        try:
            return self._parse(model, key, data)
        except CorruptRecord as e:
            if key not in _REPORTED:
                _REPORTED.add(key)
                log.warning("%s", e)
            return None

    # -- block plans ------------------------------------------------------------------------------
    def put_block_plan(self, job_id: str, plan: dict) -> None:
        """Record a blockwise job's blocks (geometry, normalisation); written once, at the split."""
        self.store.put(f"blockplans/{check_id('job', job_id)}", json.dumps(plan, separators=(",", ":")).encode())

    def block_plan(self, job_id: str) -> dict | None:
        """A blockwise job's recorded blocks, or None."""
        got = self.store.get(f"blockplans/{check_id('job', job_id)}")
        return json.loads(got[0]) if got else None

    # -- nodes --------------------------------------------------------------------------------
    def put_node(self, node: NodeInfo) -> None:
        """Record a node's registration or heartbeat (the orchestrator is its only writer)."""
        self.store.put(f"nodes/{check_id('node', node.id)}", _dump(node))

    def node(self, node_id: str) -> NodeInfo | None:
        """A node by id, or None."""
        got = self.store.get(f"nodes/{check_id('node', node_id)}")
        return self._parse_or_skip(NodeInfo, f"nodes/{node_id}", got[0]) if got else None

    def nodes(self) -> list[NodeInfo]:
        """All nodes ever registered, by registration time."""
        out = []
        for key in self.store.list("nodes"):
            got = self.store.get(key)
            node = self._parse_or_skip(NodeInfo, key, got[0]) if got else None
            if node is not None:
                out.append(node)
        return sorted(out, key=lambda n: n.registered_at)

    # -- leadership ---------------------------------------------------------------------------
    def leader(self) -> tuple[Leader, str] | None:
        """The current leader record and its etag."""
        got = self.store.get("leader")
        leader = self._parse_or_skip(Leader, "leader", got[0]) if got else None  # unreadable: nobody leads
        return (leader, got[1]) if leader is not None else None

    def claim_leadership(self, me: Leader, lease_s: float, now: float) -> bool:
        """Become (or stay) leader if the record is ours, absent, older than a lease, or unreadable.

        The first claim checks that the store honours conditional writes (an S3-compatible endpoint may not);
        without them two leaders could both win.
        """
        if not self._conditional_writes_checked:
            verify = getattr(self.store, "verify_conditional_writes", None)
            if verify is not None:
                verify()
            self._conditional_writes_checked = True
        got = self.store.get("leader")
        if got is not None:
            current, etag = self._parse_or_skip(Leader, "leader", got[0]), got[1]
            if current is not None and current.id != me.id and now - current.heartbeat_at <= lease_s \
                    and not dead_here(current):
                return False
            try:
                self.store.put("leader", _dump(me), if_match=etag)
            except StaleWrite:
                return False
            return True
        try:
            self.store.put("leader", _dump(me), if_none_match=True)
        except StaleWrite:
            return False
        return True

    def release_leadership(self, me: Leader) -> None:
        """Step down so that the next orchestrator need not wait out our lease."""
        got = self.leader()
        if got is not None and got[0].id == me.id:
            gone = me.model_copy(update={"heartbeat_at": 0.0})
            try:
                self.store.put("leader", _dump(gone), if_match=got[1])
            except StaleWrite:
                pass


def dead_here(leader: Leader) -> bool:
    """Whether the leader ran on this machine and its process is gone (a crash: no need to wait out its lease)."""
    import os
    import socket

    if leader.hostname != socket.gethostname() or leader.pid == os.getpid():
        return False
    try:
        os.kill(leader.pid, 0)
    except ProcessLookupError:
        return True
    except (PermissionError, OSError, AttributeError):
        return False
    return False


class CorruptRecord(BadInput):
    """A ledger record that cannot be parsed (a damaged file, a hand edit)."""


_REPORTED: set[str] = set()  # damaged records already logged by this process


def _dump(model: BaseModel) -> bytes:
    return json.dumps(model.model_dump(mode="json"), separators=(",", ":")).encode()

"""The ledger: the durable truth about jobs, attempts, nodes and the orchestrator's leadership.

Every status change is compare-and-set: read a record with its etag, check the status is one the
caller expects, check the move is legal (``spec.TRANSITIONS``), write only if the etag still matches.
Every record carries the leadership ``term`` of the orchestrator that wrote it last: a write of an
older term (a leader deposed without knowing it yet) is refused (fencing).
"""

from __future__ import annotations

import json
import logging
from typing import Callable, Iterable, Iterator, TypeVar

from pydantic import BaseModel

from dlorch.core.errors import BadInput, StaleWrite, first_problem
from dlorch.core.spec import TRANSITIONS, Job, JobStatus, NodeInfo, check_id
from dlorch.orchestrator.leadership import Here, Leader, LeaderWatch, Verdict, where
from dlorch.orchestrator.statestore import StateStore

log = logging.getLogger("dlorch.orchestrator")
M = TypeVar("M", bound=BaseModel)


class Ledger:
    """Typed access to the state store."""

    def __init__(self, store: StateStore) -> None:
        self.store = store
        self._conditional_writes_checked = False
        self.term = 0  # the leadership term this ledger writes in (set by a successful claim)
        self.leader_id: str | None = None  # the orchestrator that claimed it
        self.watch = LeaderWatch()  # what this process has seen of another leader's heartbeat counter
        self._live_etag: str | None = None  # the etag of the liveness record as this ledger last wrote it
        # Job and node records as this ledger last wrote them, with their etags: the next write of one is a
        # single conditional PUT on that etag, no read first (a write by anyone else in between fails it,
        # and the record is then read, fenced and written as usual). Ended jobs are dropped.
        self._mine: dict[str, tuple[str, bytes]] = {}

    # -- jobs ---------------------------------------------------------------------------------
    def create(self, job: Job) -> None:
        """Record a new job; StaleWrite if the id exists (nothing is read first: a re-sent submit finds it so).

        A marker left by a refused create of an ended job is removed by the next scan (``scan_active``).
        """
        if not job.status.is_terminal():  # indexed first: no job may run without its marker
            self.store.put(f"{ACTIVE}/{check_id('job', job.id)}", b"{}")
        key, data = f"jobs/{check_id('job', job.id)}", _dump(job, self.term)
        self._remember(key, self.store.put(key, data, if_none_match=True), data, job.status.is_terminal())

    def find(self, job_id: str) -> Job | None:
        """A job, or None if there is no such record."""
        got = self.store.get(f"jobs/{check_id('job', job_id)}")
        return self._parse(Job, f"jobs/{job_id}", got[0]) if got else None

    def read(self, job_id: str) -> tuple[Job, str]:
        """A job and its etag."""
        job, etag, _ = self._read_job(job_id)
        return job, etag

    def _read_job(self, job_id: str) -> tuple[Job, str, int]:
        """A job, its etag and the term that wrote it."""
        got = self.store.get(f"jobs/{check_id('job', job_id)}")
        if got is None:
            raise BadInput(f"no job {job_id!r}; `dlorch jobs` lists them")
        job, term = self._parse_record(Job, f"jobs/{job_id}", got[0])
        return job, got[1], term

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
                another writer changed the record meanwhile, or a newer leader wrote it.
        """
        key = f"jobs/{check_id('job', job_id)}"
        mine = self._mine.get(key)
        if mine is not None:  # as this ledger wrote it: the put below fails if anyone wrote it since
            job, term = self._parse_record(Job, key, mine[1])
            etag = mine[0]
        else:
            job, etag, term = self._read_job(job_id)
        self._fence(key, term)
        before = job.status
        if expect is not None and before not in set(expect):
            raise StaleWrite(f"job {job_id} is {before.value}, expected {', '.join(s.value for s in expect)}")
        change(job)
        if job.status != before and job.status not in TRANSITIONS[before]:
            raise StaleWrite(f"job {job_id}: illegal transition {before.value} -> {job.status.value}")
        data = _dump(job, self.term)
        try:
            self._remember(key, self.store.put(key, data, if_match=etag), data, job.status.is_terminal())
        except StaleWrite:
            self._mine.pop(key, None)
            if mine is None:
                raise
            return self.update(job_id, change, expect=expect)  # written by another meanwhile: read, fence, again
        if job.status.is_terminal() and not before.is_terminal():
            self.store.delete(f"{ACTIVE}/{job_id}")  # if this is lost, active_jobs removes the marker later
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

    def active_jobs(self) -> list[Job]:
        """The jobs that may still run (queued, running, waiting), oldest first; no ended job's record is read.

        Each such job has a marker under ``active/`` from its creation until it ends. A ledger written
        before the markers existed is indexed once, by reading every record.
        """
        return sorted(self.scan_active(), key=lambda j: (j.created_at, j.id))

    def scan_active(self) -> Iterator[Job]:
        """``active_jobs`` one record at a time, in no order: a caller may spread the reads over time."""
        if self.store.get(ACTIVE_INDEXED) is None:
            for job in self.jobs():
                if not job.status.is_terminal():
                    self.store.put(f"{ACTIVE}/{job.id}", b"{}")
            self.store.put(ACTIVE_INDEXED, b"{}")
        for key in self.store.list(ACTIVE):
            job_id = key.split("/", 1)[1]
            got = self.store.get(f"jobs/{job_id}")
            job = self._parse_or_skip(Job, f"jobs/{job_id}", got[0]) if got else None
            if job is not None and job.status.is_terminal():
                self.store.delete(key)  # its end was written but the marker's removal was lost
            elif job is not None:
                yield job

    # -- reading records ----------------------------------------------------------------------------
    def _parse(self, model: type[M], key: str, data: bytes) -> M:
        """A record, or a one-line error naming it: a damaged file is reported, never overwritten."""
        return self._parse_record(model, key, data)[0]

    def _parse_record(self, model: type[M], key: str, data: bytes) -> tuple[M, int]:
        """A record and the term that wrote it (``_parse``)."""
        try:
            fields = json.loads(data)
            term = fields.pop(TERM, 0) if isinstance(fields, dict) and TERM not in model.model_fields else 0
            return model.model_validate(fields), int(term)
        except (ValueError, TypeError) as e:  # not JSON, not the model (ValidationError), a term not a number
            root = getattr(self.store, "root", None)
            path = f"{root}/{key}.json" if root is not None else key
            raise CorruptRecord(f"ledger record {path} is unreadable ({first_problem(e)}); restore it from a backup or move it "
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
        data = json.dumps({**plan, TERM: self.term}, separators=(",", ":")).encode()
        self._put_fenced(f"blockplans/{check_id('job', job_id)}", data)

    def block_plan(self, job_id: str) -> dict | None:
        """A blockwise job's recorded blocks, or None."""
        got = self.store.get(f"blockplans/{check_id('job', job_id)}")
        if not got:
            return None
        plan = json.loads(got[0])
        plan.pop(TERM, None)
        return plan

    # -- nodes --------------------------------------------------------------------------------
    def put_node(self, node: NodeInfo) -> None:
        """Record a node's registration or heartbeat (the orchestrator is its only writer)."""
        key, data = f"nodes/{check_id('node', node.id)}", _dump(node, self.term)
        if (mine := self._mine.get(key)) is not None:  # one conditional PUT on the copy this ledger wrote
            try:
                self._remember(key, self.store.put(key, data, if_match=mine[0]), data)
                return
            except StaleWrite:
                self._mine.pop(key, None)
        self._put_fenced(key, data)

    def register_node(self, node: NodeInfo) -> NodeInfo:
        """Record a node that registers: a new one in one conditional PUT (no read first); one registered
        before keeps its first registration time. Returns the record as written."""
        key, data = f"nodes/{check_id('node', node.id)}", _dump(node, self.term)
        if key not in self._mine:
            try:
                self._remember(key, self.store.put(key, data, if_none_match=True), data)
                return node
            except StaleWrite:
                pass
        old = self.node(node.id)
        if old is not None:
            node = node.model_copy(update={"registered_at": old.registered_at})
        self.put_node(node)
        return node

    def node(self, node_id: str) -> NodeInfo | None:
        """A node by id, or None."""
        got = self.store.get(f"nodes/{check_id('node', node_id)}")
        return self._parse_or_skip(NodeInfo, f"nodes/{node_id}", got[0]) if got else None

    def nodes(self) -> list[NodeInfo]:
        """All nodes ever registered, by registration time, each with its newest heartbeat (``liveness``)."""
        beats = self.liveness().get("nodes") or {}
        out = []
        for key in self.store.list("nodes"):
            got = self.store.get(key)
            node = self._parse_or_skip(NodeInfo, key, got[0]) if got else None
            if node is not None:
                beat = beats.get(node.id)
                if isinstance(beat, (int, float)) and beat > node.heartbeat_at and node.state != "gone":
                    node.heartbeat_at = float(beat)
                out.append(node)
        return sorted(out, key=lambda n: n.registered_at)

    # -- liveness -------------------------------------------------------------------------------
    def put_liveness(self, record: dict) -> None:
        """Record every node's newest heartbeat and every running attempt's lease end, in one record.

        Renewals are written here, one write however many agents heartbeat (``leasetable.py``); a node's
        own record is written when it changes hands. The write is compare-and-set against the copy this
        ledger wrote last, so it costs one request; anything else written meanwhile is read and fenced.
        """
        data = json.dumps({**record, TERM: self.term}, separators=(",", ":")).encode()
        if self._live_etag is not None:
            try:
                self._live_etag = self.store.put(LIVENESS, data, if_match=self._live_etag)
                return
            except StaleWrite:
                self._live_etag = None
        self._put_fenced(LIVENESS, data)
        got = self.store.get(LIVENESS)
        self._live_etag = got[1] if got is not None and got[0] == data else None

    def liveness(self) -> dict:
        """The liveness record (``{"nodes": {id: heartbeat}, "jobs": {id: {token, node, expires_at}}}``), or {}."""
        got = self.store.get(LIVENESS)
        try:
            record = json.loads(got[0]) if got else {}
        except ValueError:
            return {}  # unreadable: the node records and the job records still hold their last copies
        return record if isinstance(record, dict) else {}

    # -- other records (the fleet's instances, billing, failures, work rates, scale config) -----------
    def put_record(self, key: str, record: dict, *, fenced: bool = True) -> None:
        """Write a JSON record under ``key`` (e.g. ``fleet/instances/<node>``).

        ``fenced``: written by the leading orchestrator, refused once a newer leader wrote it; unfenced
        records (the scale config ``dlorch scale`` writes) are still compare-and-set, never torn.
        """
        if not fenced:
            got = self.store.get(key)
            self.store.put(key, json.dumps(record, separators=(",", ":")).encode(),
                           if_match=got[1] if got else None, if_none_match=got is None)
            return
        self._put_fenced(key, json.dumps({**record, TERM: self.term}, separators=(",", ":")).encode())

    def record(self, key: str) -> dict | None:
        """A JSON record written by ``put_record`` (its term removed), None if absent; a damaged one is an error."""
        got = self.store.get(key)
        return None if got is None else self._plain(key, got[0])

    def records(self, prefix: str) -> list[dict]:
        """Every record under ``prefix``, by key; damaged ones are logged once and left out."""
        out = []
        for key in self.store.list(prefix):
            got = self.store.get(key)
            if got is None:
                continue
            try:
                out.append(self._plain(key, got[0]))
            except CorruptRecord as e:
                if key not in _REPORTED:
                    _REPORTED.add(key)
                    log.warning("%s", e)
        return out

    def _plain(self, key: str, data: bytes) -> dict:
        try:
            fields = json.loads(data)
            if not isinstance(fields, dict):
                raise ValueError("not a JSON object")
        except ValueError as e:
            root = getattr(self.store, "root", None)
            path = f"{root}/{key}.json" if root is not None else key
            raise CorruptRecord(f"ledger record {path} is unreadable ({first_problem(e)}); restore it from a backup "
                                "or move it aside (dlorch leaves it as it is)") from None
        fields.pop(TERM, None)
        return fields

    def _remember(self, key: str, etag: str, data: bytes, ended: bool = False) -> None:
        """Keep a job or node record as written (``_mine``); an ended job's is dropped (rarely written again)."""
        if ended:
            self._mine.pop(key, None)
        else:
            self._mine[key] = (etag, data)

    # -- fencing ----------------------------------------------------------------------------------
    def _fence(self, key: str, stored_term: int) -> None:
        """Refuse to overwrite a record that a newer leader wrote.

        A newer term stands unless the leader record still names this ledger's leader and term: then the
        record outlived the leader record it was written under (deleted, damaged) and nobody newer leads.
        """
        if stored_term <= self.term:
            return
        got = self.leader()
        if got is not None and (got[0].id, got[0].term) == (self.leader_id, self.term) and not got[0].released:
            return
        raise StaleWrite(f"{key} was written by a newer orchestrator (term {stored_term}); this one "
                         f"(term {self.term}) no longer leads")

    def _put_fenced(self, key: str, data: bytes) -> None:
        """Write a record unless a newer leader wrote it; compare-and-set, looked at again if a write came between."""
        for _ in range(5):
            got = self.store.get(key)
            if got is not None:
                self._fence(key, _term_of(got[0]))
            try:
                etag = self.store.put(key, data, if_match=got[1] if got else None, if_none_match=got is None)
                if key.startswith("nodes/"):
                    self._remember(key, etag, data)
                return
            except StaleWrite:
                continue
        raise StaleWrite(f"{key} kept changing underneath; try again")

    # -- leadership ---------------------------------------------------------------------------
    def leader(self) -> tuple[Leader, str] | None:
        """The current leader record and its etag."""
        got = self.store.get("leader")
        leader = self._parse_or_skip(Leader, "leader", got[0]) if got else None  # unreadable: nobody leads
        return (leader, got[1]) if leader is not None else None

    def leader_verdict(self, lease_s: float, now: float) -> Verdict:
        """One more look at the leader record: is its holder alive, gone, or not known yet (``now``: monotonic)."""
        got = self.leader()
        current = got[0] if got else None
        return self.watch.observe(current, where(current) if current else Here.ELSEWHERE, now, lease_s)

    def claim_leadership(self, me: Leader, lease_s: float, now: float) -> bool:
        """Become leader if the record is absent, unreadable, ours, or its holder gone; sets ``me.term``.

        ``now`` is this process's monotonic clock: a holder on another machine is gone once this ledger has
        watched its counter stand still for ``lease_s`` (no other host's clock is read). The first claim
        checks that the store honours conditional writes (an S3-compatible endpoint may not); without them
        two leaders could both win.
        """
        if not self._conditional_writes_checked:
            verify = getattr(self.store, "verify_conditional_writes", None)
            if verify is not None:
                verify()
            self._conditional_writes_checked = True
        got = self.store.get("leader")
        current = self._parse_or_skip(Leader, "leader", got[0]) if got else None
        if current is not None and current.id != me.id:
            if self.watch.observe(current, where(current), now, lease_s) is not Verdict.GONE:
                return False
            me.term = current.term + 1
        elif current is None:  # no record, or an unreadable one: nobody leads
            me.term += 1
        try:
            self.store.put("leader", _dump(me), if_match=got[1] if got else None, if_none_match=got is None)
        except StaleWrite:
            return False
        self.term, self.leader_id = me.term, me.id
        return True

    def renew_leadership(self, me: Leader) -> bool:
        """Write our record again with one more beat; False once another orchestrator holds it (we were deposed)."""
        got = self.store.get("leader")
        current = self._parse_or_skip(Leader, "leader", got[0]) if got else None
        if current is None or (current.id, current.term) != (me.id, me.term) or current.released:
            return False
        me.beats = current.beats + 1
        try:
            self.store.put("leader", _dump(me), if_match=got[1])
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


ACTIVE = "active"  # one empty record per job that may still run: the orchestrator's periodic scan lists these
ACTIVE_INDEXED = "indexes/active"  # present once every job that may run has its marker
LIVENESS = "liveness"  # every node's newest heartbeat and every lease's end, written as one record


class CorruptRecord(BadInput):
    """A ledger record that cannot be parsed (a damaged file, a hand edit)."""


_REPORTED: set[str] = set()  # damaged records already logged by this process


TERM = "term"  # the key under which a record carries the term of the leader that wrote it


def _dump(model: BaseModel, term: int | None = None) -> bytes:
    fields = model.model_dump(mode="json")
    if term is not None:
        fields[TERM] = term
    return json.dumps(fields, separators=(",", ":")).encode()


def _term_of(data: bytes) -> int:
    """The term a stored record was written in (0 for one written before terms, or unreadable)."""
    try:
        term = json.loads(data).get(TERM, 0)
        return term if isinstance(term, int) else 0
    except (ValueError, AttributeError):
        return 0

"""Scale of one orchestrator: N simulated agents heartbeating against a real `dlorch up` over a real redis-server.

Each run starts a redis-server on a free port (no persistence), optionally moto's S3 server for the ledger,
and `python -m dlorch.orchestrator.cli up`. Worker processes then simulate the agents, each speaking the real
protocol (signed, enveloped requests through ``Queue.request``): register, claim one job of their own, and
heartbeat it every 3 s. Meanwhile a few block pullers drive a blockwise job of tiny blocks through
``next_block`` (each request also reporting the block before as done) without computing anything.

Each simulated agent heartbeats as nodeagent's heartbeat thread does: a heartbeat not answered within two
intervals (6 s) is given up (counted in ``heartbeat_errors``) and the next one sent, with a send time of its
own; an agent that instead waited a minute on one request sent no newer heartbeat meanwhile, and a backlog
longer than a lease then expired the lease of an agent that was alive.

Measured over ``--duration`` seconds once every agent holds its job:
  false_expiries      attempts the orchestrator ended as expired (or leases a heartbeat found lost) while
                      their agent was alive and heartbeating: the target is 0
  heartbeat_p50/p99   request-to-reply time of the heartbeats, in ms
  cpu_share           the orchestrator process's CPU seconds over wall seconds (1.0 = one core)
  noop_blocks_per_s   blocks handed out and reported done per second

    python bench/orchestrator_load.py [--agents 1,100,1000,2000] [--ledger local|s3] [--duration 60] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SECRET = "bench-secret"
HEARTBEAT_S = 3.0
PULLERS = 8  # threads pulling blocks
PROCS_MIN = 1  # worker processes at least (the simulated agents and pullers are spread over them)
BLOCKS = 20_000  # blocks of the no-op blockwise job (the rate is taken until the last is done)
_COUNT = threading.Lock()  # the counters a worker process's threads share


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port}")


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


# -- the simulated agents (worker processes) --------------------------------------------------------------
def _queue(url: str, sender: str):
    from dlorch.core.wire import Signer
    from dlorch.orchestrator.queue import Queue

    return Queue(url, Signer(SECRET.encode()), sender=sender)


def _register(q, node: str) -> None:
    from dlorch.core.protocol import NodeAnnouncement, Register

    info = NodeAnnouncement(id=node, hostname="bench", pid=os.getpid(), cpus=1, memory_bytes=1 << 30)
    q.request(Register(node_info=info), timeout=600)  # a thousand agents joining at once wait their turn


def _agent_thread(url: str, node: str, job: str, stop, out: dict) -> None:
    """Simulate one agent: register, claim its job, then heartbeat every 3 s until ``stop``.

    One thread per agent, as a real agent heartbeats from a thread of its own: an agent's heartbeats never
    wait on another agent's registration or claim.
    """
    from dlorch.core.protocol import Claim, Heartbeat

    q = _queue(url, node)
    try:
        _register(q, node)
        reply = q.request(Claim(node=node, job=job, token=1), timeout=600)
    except Exception as e:  # noqa: BLE001 -- counted: an agent that never got going
        out["errors"].append(f"setup {type(e).__name__}: {e}"[:200])
        reply = {}
    with _COUNT:
        out["claims_refused"] += not reply.get("ok")
        out["ready"] += 1
    due = time.monotonic() + HEARTBEAT_S
    while not stop.wait(max(0.0, due - time.monotonic())):
        due += HEARTBEAT_S
        t0 = time.monotonic()
        try:  # as nodeagent's heartbeat thread: a heartbeat unanswered after two intervals gives way to the next
            reply = q.request(Heartbeat(node=node, job=job, token=1), timeout=2 * HEARTBEAT_S, stop=stop)
        except Exception as e:  # an unanswered heartbeat is counted, not fatal to the bench
            if stop.is_set():
                break
            out["errors"].append(f"{type(e).__name__}: {e}"[:200])
            continue
        took = time.monotonic() - t0
        due = max(due, time.monotonic())  # a late reply: the next one 3 s from the due time, never in a burst
        if time.time() >= out["start"]:  # measured from the start the parent set
            out["latencies"].append(took)
            if reply.get("lease") is False:
                out["leases_lost"].append(node)
    q.close()


def _puller_thread(url: str, node: str, stop, out: dict) -> None:
    """Pull blocks of the no-op job and report each as done with the next request."""
    from dlorch.core.protocol import BlockReport, NextBlock

    q = _queue(url, node)
    _register(q, node)
    done: list[BlockReport] = []
    job, last, have = None, None, []
    while not stop.is_set():
        try:
            reply = q.request(NextBlock(node=node, job=job, after=last, have=have, done=done), timeout=60, stop=stop)
        except Exception as e:
            if stop.is_set():
                break
            out["errors"].append(f"{type(e).__name__}: {e}"[:200])
            continue
        done = []
        if reply.get("block") is None:
            stop.wait(0.2)
            continue
        job, last = reply["job"], reply["block"]["index"]
        have = [job]
        done = [BlockReport(job=job, block=last)]
        if time.time() >= out["start"]:
            with _COUNT:
                out["blocks"] += 1
                out["last_block_at"] = time.time()
    q.close()


def worker(url: str, agents: list[tuple[str, str]], pullers: list[str], start_at, stop_at, results) -> None:
    """A process simulating ``agents`` (a thread each) and ``pullers``; results go to ``results``."""
    threading.stack_size(256 * 1024)  # hundreds of threads, each a few frames deep
    stop = threading.Event()
    out = {"latencies": [], "leases_lost": [], "errors": [], "ready": 0, "claims_refused": 0, "blocks": 0,
           "start": float("inf"), "last_block_at": 0.0}
    ts = [threading.Thread(target=_agent_thread, args=(url, node, job, stop, out), daemon=True)
          for node, job in agents]
    for t in ts:
        t.start()
    while out["ready"] < len(agents):  # every agent holds its job: tell the parent, wait for the start
        time.sleep(0.1)
    results.put(("ready", len(agents)))
    while start_at.value == 0.0:
        time.sleep(0.05)
    out["start"] = start_at.value  # the threads read it from here
    ps = [threading.Thread(target=_puller_thread, args=(url, p, stop, out), daemon=True) for p in pullers]
    for t in ps:
        t.start()
    while stop_at.value == 0.0:
        time.sleep(0.1)
    stop.set()
    for t in ts + ps:
        t.join(timeout=90)
    results.put(("done", out))


# -- one run -------------------------------------------------------------------------------------------------
class Services:
    """redis-server, moto (for an S3 ledger) and `dlorch up`, in a scratch directory."""

    def __init__(self, ledger: str, tmp: Path) -> None:
        self.tmp, self.procs, self.moto = tmp, [], None
        port = free_port()
        self.procs.append(subprocess.Popen([shutil.which("redis-server") or "redis-server", "--port", str(port),
                                            "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                                            "--dir", str(tmp)], stdout=subprocess.DEVNULL))
        wait_port(port)
        self.url = f"redis://127.0.0.1:{port}/0"
        env = {**os.environ, "DLORCH_QUEUE": self.url, "DLORCH_SECRET": SECRET, "DLORCH_HOME": str(tmp / "home"),
               "DLORCH_HEARTBEAT_S": str(HEARTBEAT_S)}
        if ledger == "s3":
            import logging

            from moto.server import ThreadedMotoServer

            logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request
            mport = free_port()
            self.moto = ThreadedMotoServer(ip_address="127.0.0.1", port=mport)
            self.moto.start()
            aws = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
                   "AWS_ENDPOINT_URL": f"http://127.0.0.1:{mport}"}
            os.environ.update(aws)
            env.update(aws)
            env["DLORCH_STORE"] = fresh_s3_store(aws["AWS_ENDPOINT_URL"])
        else:
            env["DLORCH_STORE"] = str(tmp / "store")
        self.store = env["DLORCH_STORE"]
        self.log = open(tmp / "orchestrator.log", "w")
        self.orch = subprocess.Popen([sys.executable, "-m", "dlorch.orchestrator.cli", "up"], env=env,
                                     stdout=self.log, stderr=subprocess.STDOUT, cwd=tmp)
        self.procs.append(self.orch)

    def stop_orchestrator(self) -> None:
        if self.orch.poll() is None:
            self.orch.terminate()
            try:
                self.orch.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.orch.kill()

    def close(self) -> None:
        self.stop_orchestrator()
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        if self.moto is not None:
            import urllib.request

            # moto's objects outlive its server: drop them, or the next runs carry this run's ledger in memory
            urllib.request.urlopen(urllib.request.Request(f"{os.environ['AWS_ENDPOINT_URL']}/moto-api/reset",
                                                          method="POST"))
            self.moto.stop()
        self.log.close()


def fresh_s3_store(endpoint: str) -> str:
    """A store URL in a bucket of its own: moto keeps its objects per process, not per server, so every run
    of one invocation would otherwise find the ledger of the run before (its jobs, its split blockwise job)."""
    import uuid

    import boto3

    bucket = f"bench-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=bucket)
    return f"s3://{bucket}/dlorch"


def _client(url: str):
    return _queue(url, f"client-bench{os.getpid()}")


SUBMITTERS = 16  # client threads submitting the agents' jobs: the orchestrator reads their requests together


def _submit_jobs(url: str, store: str, n: int) -> list[str]:
    """Submit ``n`` jobs from a few client threads at once (each a client of its own, as users are)."""
    from concurrent.futures import ThreadPoolExecutor

    from dlorch.core.protocol import Submit

    def submit_every(k: int) -> list[str]:
        q, ids = _queue(url, f"client-bench{os.getpid()}-{k}"), []
        for i in range(k, n, SUBMITTERS):
            spec = {"kind": "train", "image": f"{store}/in/i.npy", "labels": f"{store}/in/l.npy", "epochs": 1000}
            reply = q.request(Submit.model_validate({"spec": spec, "job_id": f"load-{i:05d}"}), timeout=600)
            if not reply.get("ok"):
                raise RuntimeError(f"submit refused: {reply}")
            ids.append(reply["job"])
        q.close()
        return ids

    with ThreadPoolExecutor(SUBMITTERS) as pool:
        return sorted(j for ids in pool.map(submit_every, range(SUBMITTERS)) for j in ids)


def _blockwise_job(url: str, store: str) -> str:
    """A predict job split (by a simulated planner) into many one-voxel-slice blocks."""
    from dlorch.core.protocol import Claim, Finish, Submit

    q = _client(url)
    spec = {"kind": "predict", "image": f"{store}/in/v.zarr", "model": f"{store}/in/m.ckpt", "output_format": "zarr"}
    jid = q.request(Submit.model_validate({"spec": spec, "job_id": "load-blocks"}), timeout=120)["job"]
    planner = _queue(url, "planner")
    _register(planner, "planner")
    claimed = planner.request(Claim(node="planner", job=jid, token=1), timeout=120)
    if not claimed.get("ok"):
        raise RuntimeError(f"the planner's claim was refused: {claimed}")
    blocks = [{"index": i, "core": [[i, i + 1], [0, 8]], "read": [[i, i + 1], [0, 8]]} for i in range(BLOCKS)]
    finish = Finish.model_validate({"node": "planner", "job": jid, "token": 1, "outcome": "split", "norm": {},
                                    "output": f"{store}/jobs/{jid}/output.zarr", "blocks": blocks,
                                    "voxels": 8 * BLOCKS})
    reply = planner.request(finish, timeout=300)
    if reply.get("status") != "waiting":
        raise RuntimeError(f"split refused: {reply}")
    q.close()
    planner.close()
    return jid


def _expired_jobs(store: str, jobs: list[str]) -> set[str]:
    """The agents' jobs of which the ledger shows an attempt ended by lease expiry."""
    from dlorch.core.spec import AttemptOutcome
    from dlorch.orchestrator.ledger import Ledger
    from dlorch.orchestrator.statestore import open_state_store

    ledger = Ledger(open_state_store(store))
    return {jid for jid in jobs if any(a.outcome is AttemptOutcome.EXPIRED for a in ledger.get(jid).attempts)}


def run_once(agents: int, ledger: str, duration: float) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="dlorch-load-"))
    svc = Services(ledger, tmp)
    try:
        return _measure(svc, agents, ledger, duration)
    finally:
        svc.close()
        shutil.rmtree(tmp, ignore_errors=True)


def _measure(svc: Services, agents: int, ledger: str, duration: float) -> dict:
    t_setup = time.monotonic()
    jobs = _submit_jobs(svc.url, svc.store, agents)  # waits for the orchestrator to answer
    _blockwise_job(svc.url, svc.store)
    nodes = [(f"sim-{i:05d}", jid) for i, jid in enumerate(jobs)]
    procs_n = max(PROCS_MIN, min(4, agents // 250))
    ctx = mp.get_context("spawn")
    start_at, stop_at, results = ctx.Value("d", 0.0), ctx.Value("d", 0.0), ctx.Queue()
    pullers = [f"puller-{i}" for i in range(PULLERS)]
    procs = [ctx.Process(target=worker, daemon=True,
                         args=(svc.url, nodes[k::procs_n], pullers[k::procs_n], start_at, stop_at, results))
             for k in range(procs_n)]
    for p in procs:
        p.start()
    for _ in procs:
        results.get(timeout=1800)  # ("ready", n)
    setup_s = time.monotonic() - t_setup
    cpu0, t0 = cpu_seconds(svc.orch.pid), time.time()
    start_at.value = t0
    time.sleep(duration)
    cpu1, t1 = cpu_seconds(svc.orch.pid), time.time()
    stop_at.value = t1  # the agents stop within a request; their leases have most of a lease left
    outs = [results.get(timeout=300)[1] for _ in procs]
    svc.stop_orchestrator()
    for p in procs:
        p.join(timeout=30)
    last_block = max([o["last_block_at"] for o in outs if o["blocks"]] or [t1])
    latencies = [x for o in outs for x in o["latencies"]]
    lost = {n for o in outs for n in o["leases_lost"]}
    expired = _expired_jobs(svc.store, jobs)
    job_of = dict(nodes)
    return {
        "agents": agents, "ledger": ledger, "duration_s": round(t1 - t0, 1), "setup_s": round(setup_s, 1),
        "false_expiries": len(expired | {job_of[n] for n in lost}), "expired_jobs": len(expired),
        "leases_lost": len(lost),
        "heartbeats": len(latencies), "heartbeat_errors": sum(len(o["errors"]) for o in outs),
        "error_samples": sorted({e for o in outs for e in o["errors"]})[:5],
        "claims_refused": sum(o["claims_refused"] for o in outs),
        "heartbeat_p50_ms": round(percentile(latencies, 0.50) * 1000, 1),
        "heartbeat_p99_ms": round(percentile(latencies, 0.99) * 1000, 1),
        "cpu_share": round((cpu1 - cpu0) / (t1 - t0), 3),
        "noop_blocks_per_s": round(sum(o["blocks"] for o in outs) / max(1e-3, min(t1, last_block) - t0), 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--agents", default="1,100,1000,2000", help="comma-separated agent counts")
    ap.add_argument("--ledger", default="local", help="local, s3, or both (local,s3)")
    ap.add_argument("--duration", type=float, default=60.0, help="seconds measured per run")
    ap.add_argument("--json", default=str(REPO / "bench" / "results" / "orchestrator_load.json"))
    args = ap.parse_args()
    rows = []
    for ledger in args.ledger.split(","):
        for n in (int(a) for a in args.agents.split(",")):
            print(f"-- {n} agents, {ledger} ledger ...", file=sys.stderr, flush=True)
            rows.append(run_once(n, ledger, args.duration))
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(rows, indent=2))
    cols = ["agents", "ledger", "false_expiries", "heartbeat_p50_ms", "heartbeat_p99_ms", "cpu_share",
            "noop_blocks_per_s", "heartbeats", "heartbeat_errors", "setup_s"]
    print(" | ".join(cols))
    for r in rows:
        print(" | ".join(str(r[c]) for c in cols))
    print(f"JSON: {args.json}")


if __name__ == "__main__":
    main()

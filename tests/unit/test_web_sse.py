"""The multiplexed event stream: every source once, then only changes; shared reads; keepalives; stop."""

from __future__ import annotations

import asyncio
import json
import threading

from dlorch.orchestrator.web.sse import EventStream


def _parse(chunk: str) -> tuple[str, object] | None:
    lines = dict(line.split(": ", 1) for line in chunk.strip().splitlines() if ": " in line and not line.startswith(":"))
    return (lines["event"], json.loads(lines["data"])) if "event" in lines else None


def test_sources_are_sent_once_then_only_when_they_change():
    state = {"jobs": [1], "nodes": ["a"]}
    reads = {"jobs": 0}

    def jobs():
        reads["jobs"] += 1
        return state["jobs"]

    stop = threading.Event()
    stream = EventStream({"jobs": jobs, "nodes": lambda: state["nodes"]}, interval_s=0.05, keepalive_s=0.12,
                         stop=stop)

    async def run():
        got, keepalives = [], 0
        agen = stream.events(extra={"job": lambda: {"id": "j-1"}})
        assert (await agen.__anext__()).startswith("retry: ")
        async for chunk in agen:
            event = _parse(chunk)
            if event is None:
                keepalives += 1
            else:
                got.append(event)
            if len(got) == 3 and state["jobs"] == [1]:
                state["jobs"] = [1, 2]  # a change: sent once, at the next tick
            if keepalives == 2:
                stop.set()  # the server stops: the stream ends
        return got, keepalives

    got, keepalives = asyncio.run(asyncio.wait_for(run(), 10))
    assert got == [("jobs", [1]), ("nodes", ["a"]), ("job", {"id": "j-1"}), ("jobs", [1, 2])]
    assert keepalives == 2 and stream.clients == 0


def test_a_source_is_read_once_per_interval_however_many_clients_and_a_failing_one_is_skipped():
    reads = []
    stream = EventStream({"jobs": lambda: reads.append(1) or len(reads), "bad": lambda: 1 / 0}, interval_s=60)

    async def first_events():
        agens = [stream.events() for _ in range(3)]
        out = []
        for agen in agens:
            await agen.__anext__()  # retry line
            out.append(_parse(await agen.__anext__()))
        stream.stop.set()
        return out

    out = asyncio.run(asyncio.wait_for(first_events(), 10))
    assert out == [("jobs", 1)] * 3 and len(reads) == 1  # the "bad" source raised: nothing sent for it


def test_poke_wakes_the_streams_and_reads_afresh():
    value = {"v": 0}
    stream = EventStream({"x": lambda: value["v"]}, interval_s=30)

    async def run():
        agen = stream.events()
        await agen.__anext__()
        assert _parse(await agen.__anext__()) == ("x", 0)
        value["v"] = 1
        stream.poke()  # an action changed something: no waiting out the 30 s interval
        return _parse(await asyncio.wait_for(agen.__anext__(), 5))

    assert asyncio.run(run()) == ("x", 1)

"""The dashboard of a real `dlorch up` in headless Chromium: jobs, queue and nodes update live while an agent
trains; the cancel button cancels a running job through the orchestrator; the drain button sends the node home."""

from __future__ import annotations

import concurrent.futures
import json
import re
import time
import urllib.request

from tests.conftest import free_port, synthetic_pair
from tests.system.browser import chromium_page, screenshot
from tests.system.harness import cli_env, dlorch, spawn, wait_for


def _get(url: str):
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.loads(r.read())


def _up(url: str) -> bool:
    try:
        return bool(_get(url + "api/summary"))
    except OSError:
        return False


def test_dashboard_follows_jobs_and_nodes_and_cancels_with_its_button(tmp_path):
    home = tmp_path / "home"
    env = cli_env(DLORCH_HOME=str(home), DLORCH_LEASE_S="5", DLORCH_HEARTBEAT_S="1")
    for var in ("DLORCH_STORE", "DLORCH_QUEUE", "DLORCH_SECRET"):
        env.pop(var, None)
    image, labels = synthetic_pair(tmp_path)
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    up = spawn("up", "--agents", "1", "--port", str(port), env=env, log=tmp_path / "up.log")
    try:
        t0 = time.monotonic()
        phase = lambda what: print(f"{time.monotonic() - t0:6.1f}s {what}")  # noqa: E731
        wait_for(lambda: _up(url), 60, what="the dashboard")
        phase("dashboard up")
        assert f"dashboard: {url}" in (tmp_path / "up.log").read_text()
        with chromium_page() as page:
            page.goto(url)
            page.wait_for_selector("#live.on", timeout=20_000)
            assert page.is_visible("#jobs-empty")

            def submit(*args: str) -> str:
                return dlorch("train", "segment", str(image), "--labels", str(labels), *args, "--detach",
                              env=env).stdout.strip()

            # Submitted while the agent starts (the CLI's own start-up overlaps the agent's).
            first = concurrent.futures.ThreadPoolExecutor(1).submit(submit, "--epochs", "200")
            # The local agent registers: its row appears, with hardware and a fresh heartbeat.
            node_row = page.wait_for_selector("#nodes tbody tr[data-node]", timeout=60_000)
            phase("node registered")
            assert re.search(r"\d+ CPUs, \d+ GiB", node_row.inner_text())
            assert re.search(r"\d+ s ago", node_row.inner_text())
            long_job = first.result(timeout=60)
            long_row = f'#jobs tbody tr[data-job="{long_job}"]'
            page.wait_for_selector(f'{long_row}[data-status="running"]', timeout=60_000)
            phase("long job running")
            short_job = submit("--epochs", "2", "--priority", "5")
            # The queue lists the waiting job with its priority; the nodes table, the running one.
            queued = page.wait_for_selector(f'#queue tbody tr[data-job="{short_job}"]', timeout=20_000)
            assert "5" in queued.inner_text() and "queued" in queued.inner_text()
            page.wait_for_function("id => document.querySelector('#nodes').innerText.includes(id)", arg=long_job,
                                   timeout=10_000)  # the node's current job, from its heartbeat

            page.click(f"{long_row} button.cancel")
            page.wait_for_selector(f'{long_row}[data-status="cancelled"]', timeout=20_000)
            assert f"cancelled {long_job}" in page.inner_text("#message")
            record = json.loads((home / "ledger" / "jobs" / f"{long_job}.json").read_text())
            assert record["status"] == "cancelled" and record["cancel_requested"]

            # The node takes the next job; it trains to the end, the page following it.
            phase("cancelled")
            short_row = f'#jobs tbody tr[data-job="{short_job}"]'
            page.wait_for_selector(f'{short_row}[data-status="succeeded"]', timeout=90_000)
            phase("short job succeeded")
            assert "2/2 epochs" in page.inner_text(short_row)
            assert page.is_visible("#queue-empty")
            # The status counts filter the jobs table.
            page.click('#counts button[data-status="cancelled"]')
            assert page.eval_on_selector_all("#jobs tbody tr", "trs => trs.map(t => t.dataset.job)") == [long_job]
            page.click('#counts button[data-status="cancelled"]')
            assert len(page.query_selector_all("#jobs tbody tr")) == 2
            page.click(short_row)
            page.wait_for_selector("#chart-loss polyline.train_loss", timeout=10_000)
            page.wait_for_selector("#chart-score polyline.val_iou", timeout=10_000)
            page.wait_for_function("() => document.querySelector('#logs').innerText.includes('succeeded on node')",
                                   timeout=10_000)
            assert page.inner_text("#attempts tbody").count("succeeded") == 1
            page.click(long_row)  # the cancelled job's detail: its attempt ended cancelled
            page.wait_for_function("() => document.querySelector('#attempts tbody')?.innerText.includes('cancelled')",
                                   timeout=10_000)
            page.click(short_row)
            page.wait_for_selector("#chart-loss polyline.train_loss", timeout=10_000)
            screenshot(page, "dashboard")

            # Drain: the node hands back nothing (it is idle), leaves, and its row goes.
            phase("detail shown")
            page.click("#nodes tbody button.drain")
            page.wait_for_selector("#nodes-empty", state="visible", timeout=30_000)
            phase("node drained")
            assert up.poll() is None
            assert page.console_errors == []
        api = _get(url + "api/jobs")
        assert {j["id"]: j["status"] for j in api} == {long_job: "cancelled", short_job: "succeeded"}
        assert "/api/jobs/{job_id}/cancel" in _get(url + "openapi.json")["paths"]
    finally:
        up.terminate()
        up.wait(timeout=60)


"""The wizard's speed as a user meets it: stroke round trips, and "Train candidates" to four predictions on screen.

A real `dlorch wizard` (embedded queue and store in a temporary home, two local agents) is opened in
headless Chromium on a 1024x1024 image: four ISBI 2012 slices side by side, with their ~50,000 painted
stroke pixels loaded as labels from a file (as napari's would be). Then:

  stroke_p50/p95_ms   mouse strokes painted on the page (brush 1..24 px), from the stroke's request to the
                      server's acknowledgement (its bounding box written to the session's zarr), in ms;
                      painted once the wizard's two agents have started (as they have while a user paints)
  train_to_screen_s   from the click on "Train candidates" to all four candidates' predictions drawn on
                      the page (four training jobs on two agents, each with --time-budget, then four
                      predictions with confidence)
  slice_ms            one 1024x1024 slice of the image fetched by the page

With --large, the session itself (no page, no server) on a 2048x2048 image and a 512^3 volume: the
seconds to create it, a slice read and a stroke written (20x20 px, acknowledged once stored), in ms.

    python bench/wizard.py [--time-budget 45] [--strokes 60] [--large] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "isbi2012-em"
sys.path.insert(0, str(REPO))


def mosaic() -> tuple[np.ndarray, np.ndarray]:
    """Slices 0-3 of ISBI 2012 as one 1024x1024 image, and their painted strokes."""
    image = np.load(DATA / "isbi2012_train.npz")["image"][:4]
    strokes = np.load(DATA / "isbi2012_sparse_strokes.npz")["labels"][:4]
    tile = lambda a: np.block([[a[0], a[1]], [a[2], a[3]]])  # noqa: E731
    return tile(image), tile(strokes).astype(np.uint8)


def until(page, js: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if page.evaluate(js):
            return
        time.sleep(0.1)
    raise RuntimeError(f"timed out after {timeout:.0f}s waiting for {js}; message: {page.text_content('#message')!r}")


def wait_agents(env: dict, n: int, timeout: float = 300) -> float:
    """Seconds until ``n`` agents are registered (the wizard starts them beside its page)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        out = subprocess.run([sys.executable, "-m", "dlorch.orchestrator.cli", "nodes", "--json"], env=env,
                             capture_output=True, text=True).stdout
        try:
            if len(json.loads(out or "[]")) >= n:
                return time.monotonic() - t0
        except ValueError:
            pass
        time.sleep(1)
    raise RuntimeError(f"{n} agents did not register within {timeout:.0f}s")


def paint(page, n: int, rng: np.random.Generator) -> list[float]:
    """``n`` mouse strokes of random sizes and directions; returns the page's round trips in ms."""
    for i in range(n):
        size = int(rng.integers(1, 25))
        page.evaluate("(size) => { const s = document.getElementById('size'); s.value = size;"
                      " s.dispatchEvent(new Event('input')); }", size)
        page.click(f'#palette li[data-id="{1 + i % 2}"] .swatch')
        x, y = rng.integers(50, 970, size=2)
        dx, dy = rng.integers(-40, 41, size=2)
        a = page.evaluate(f"window.wizard.toScreen({x}, {y})")
        b = page.evaluate(f"window.wizard.toScreen({x + dx}, {y + dy})")
        page.mouse.move(a["x"], a["y"])
        page.mouse.down()
        page.mouse.move(b["x"], b["y"], steps=6)
        page.mouse.up()
        until(page, "window.wizard.idle()", 30)  # one stroke at a time: each trip measured on its own
    return page.evaluate("window.wizard.roundTrips()")


def breakdown(home: Path, state: dict, clicked_at: float, on_screen_at: float) -> dict:
    """Where the seconds from "Train candidates" to the four predictions on screen went, from the jobs' records.

    Per candidate: queued (submission to a node taking the training), plan, training, the model's upload, the
    prediction queued, predicted (with its confidence map), its upload; then what the page took after the last
    prediction ended (the server bringing it into the session, the page fetching and drawing it).
    """
    from dlorch.core.settings import Settings
    from dlorch.orchestrator.client import Client

    before = os.environ.get("DLORCH_HOME")
    os.environ["DLORCH_HOME"] = str(home)
    try:
        ledger = Client(Settings()).ledger
        rows, last_end = {}, clicked_at
        for variant, cand in state["rounds"][0]["candidates"].items():
            train, pred = ledger.get(cand["train_job"]), ledger.get(cand["predict_job"])
            t, p = train.attempts[-1], pred.attempts[-1]
            rows[variant] = {
                "submitted_s": train.created_at - clicked_at, "queued_s": t.started_at - train.created_at,
                "plan_s": t.timings.get("plan_s", 0.0), "train_s": t.timings.get("train_s", 0.0),
                "upload_model_s": t.timings.get("upload_model_s", 0.0),
                "attempt_s": t.ended_at - t.started_at, "predict_queued_s": p.started_at - pred.created_at,
                "predict_s": p.timings.get("predict_s", 0.0), "predict_attempt_s": p.ended_at - p.started_at,
                "node": t.node, "predict_node": p.node, "epochs": train.epochs_done,
                "steps_per_epoch": (train.plan or {}).get("steps_per_epoch"),
                "tta": (train.plan or {}).get("tta"),
            }
            last_end = max(last_end, p.ended_at)
        return {"candidates": rows, "after_last_prediction_s": on_screen_at - last_end,
                "last_prediction_ended_s": last_end - clicked_at}
    finally:
        if before is None:
            os.environ.pop("DLORCH_HOME", None)
        else:
            os.environ["DLORCH_HOME"] = before


def run(args) -> dict:
    from tests.system.browser import chromium_page

    image, strokes = mosaic()
    with tempfile.TemporaryDirectory(prefix="dlorch-bench-wizard-") as tmp:
        tmp = Path(tmp)
        np.save(tmp / "image.npy", image)
        np.save(tmp / "strokes.npy", strokes)
        env = {**os.environ, "DLORCH_HOME": str(tmp / "home"), "DLORCH_HEARTBEAT_S": "1"}
        cmd = [sys.executable, "-m", "dlorch.orchestrator.cli", "wizard", str(tmp / "image.npy"), "--labels",
               str(tmp / "strokes.npy"), "--no-browser", "--time-budget", str(args.time_budget),
               "--export-dir", str(tmp / "export")]
        log = open(tmp / "wizard.log", "wb")
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=log, text=True)
        try:
            line: list[str] = []
            reader = threading.Thread(target=lambda: line.append(proc.stdout.readline()), daemon=True)
            reader.start()
            reader.join(120)
            if not line or not line[0].startswith("http"):
                raise RuntimeError(f"no URL from dlorch wizard: {(tmp / 'wizard.log').read_text()[-2000:]}")
            with chromium_page(width=1400, height=1000, timeout_ms=60_000) as page:
                page.goto(line[0].strip())
                until(page, "window.wizard && window.wizard.W.state && window.wizard.W.slices.size >= 3", 60)
                slice_ms = page.evaluate("(async () => { const t = performance.now();"
                                         " await fetch('/api/slice/image?z=0').then(r => r.arrayBuffer());"
                                         " return performance.now() - t; })()")
                painted = sum(page.evaluate("window.wizard.W.state.counts.painted")[1:])
                agents_ready_s = wait_agents(env, 2)  # strokes measured as a user paints: agents started
                trips = paint(page, args.strokes, np.random.default_rng(0))
                t0, clicked_at = time.monotonic(), time.time()
                page.click("#train")
                until(page, "(() => { const c = [...document.querySelectorAll('.cand[data-status=ready]')];"
                            " return c.length == 4 && window.wizard.W.state.rounds[0] && Object.values("
                            "window.wizard.W.state.rounds[0].candidates).every(k => k.layer &&"
                            " window.wizard.W.slices.has(k.layer + ':0')); })()", args.timeout)
                train_s, on_screen_at = time.monotonic() - t0, time.time()
                state = page.evaluate("window.wizard.W.state")
                where = breakdown(tmp / "home", state, clicked_at, on_screen_at)
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(120)
            except subprocess.TimeoutExpired:
                proc.kill()
            log.close()
    cands = state["rounds"][0]["candidates"]
    return {
        "date": time.strftime("%Y-%m-%d"), "machine": f"{platform.processor() or platform.machine()}, "
                                                      f"{os.cpu_count()} CPUs",
        "image": list(image.shape), "painted_pixels": int(painted), "agents": 2, "time_budget_s": args.time_budget,
        "strokes": len(trips), "stroke_p50_ms": float(np.percentile(trips, 50)),
        "stroke_p95_ms": float(np.percentile(trips, 95)), "slice_ms": float(slice_ms),
        "train_to_screen_s": train_s, "agents_ready_after_page_s": agents_ready_s,
        "candidates": {v: {"node": c["node"], "epochs": c["epoch"], "held_out": c["score"]} for v, c in cands.items()},
        "where_the_time_went": where,
    }


def large() -> dict:
    """Session creation, slice reads and strokes on a 2048x2048 image and a 512^3 volume."""
    from dlorch.core.store import DataStore
    from dlorch.orchestrator.web.wizardstate import Session

    out = {}
    rng = np.random.default_rng(0)
    for name, shape in (("2048x2048", (2048, 2048)), ("512^3", (512, 512, 512))):
        data = rng.integers(0, 255, shape, dtype=np.uint8)
        with tempfile.TemporaryDirectory(prefix="dlorch-bench-wizard-") as tmp:
            t = time.perf_counter()
            s = Session.create(DataStore(tmp), data, name, "bench")
            created = time.perf_counter() - t
            Z = s.state.shape[0]
            reads, strokes = [], []
            for i in range(20):
                t = time.perf_counter()
                s.window("image", (i * 37) % Z)
                reads.append(time.perf_counter() - t)
                t = time.perf_counter()
                s.apply_patch("painted", s.state.revision + 1, (i * 37) % Z, 300 + 5 * i, 300 + 7 * i,
                              np.ones((20, 20), np.uint8))
                strokes.append(time.perf_counter() - t)
        out[name] = {"create_s": created, "slice_p50_ms": 1000 * float(np.median(reads)),
                     "stroke_p50_ms": 1000 * float(np.median(strokes)),
                     "stroke_p95_ms": 1000 * float(np.percentile(strokes, 95))}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--time-budget", type=float, default=45, help="training seconds of each candidate")
    ap.add_argument("--strokes", type=int, default=60, help="mouse strokes painted to measure round trips")
    ap.add_argument("--timeout", type=float, default=900, help="give up on the candidates after this long")
    ap.add_argument("--large", action="store_true", help="also time the session on 2048x2048 and 512^3")
    ap.add_argument("--json", type=Path, help="write the results here")
    args = ap.parse_args()
    r = run(args)
    if args.large:
        r["large"] = large()
    print(f"wizard on a {r['image'][0]}x{r['image'][1]} image, {r['painted_pixels']:,} painted pixels, "
          f"{r['agents']} local agents, {r['time_budget_s']:.0f} s per candidate ({r['machine']})")
    print(f"{'metric':<28}{'value':>12}")
    for key, fmt in (("stroke_p50_ms", "{:.1f}"), ("stroke_p95_ms", "{:.1f}"), ("slice_ms", "{:.1f}"),
                     ("train_to_screen_s", "{:.1f}")):
        print(f"{key:<28}{fmt.format(r[key]):>12}")
    for v, c in r["candidates"].items():
        print(f"  {v:<26}{c['node']}, {c['epochs']} epochs, held-out {c['held_out']}")
    where = r["where_the_time_went"]
    print(f"{'candidate':<20}{'submit':>7}{'queued':>8}{'plan':>7}{'train':>7}{'upload':>7}{'p.queue':>8}"
          f"{'predict':>8}{'p.total':>8}  (seconds after the click / of each step)")
    for v, w in where["candidates"].items():
        print(f"{v:<20}{w['submitted_s']:>7.1f}{w['queued_s']:>8.1f}{w['plan_s']:>7.1f}{w['train_s']:>7.1f}"
              f"{w['upload_model_s']:>7.1f}{w['predict_queued_s']:>8.1f}{w['predict_s']:>8.1f}"
              f"{w['predict_attempt_s']:>8.1f}")
    print(f"last prediction ended {where['last_prediction_ended_s']:.1f} s after the click; on screen "
          f"{where['after_last_prediction_s']:.1f} s later")
    for name, m in r.get("large", {}).items():
        print(f"  session on {name}: created in {m['create_s']:.1f} s, slice {m['slice_p50_ms']:.1f} ms, "
              f"stroke p50 {m['stroke_p50_ms']:.1f} ms, p95 {m['stroke_p95_ms']:.1f} ms")
    if args.json:
        args.json.write_text(json.dumps(r, indent=1))


if __name__ == "__main__":
    main()

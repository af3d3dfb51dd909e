"""The bootstrapping wizard in real headless Chromium against a real `dlorch wizard` with local agents.

Strokes are painted with the mouse on a crop of ISBI 2012, four candidates train on local agents, the
page shows their predictions side by side, one is picked, corrected (an accepted box, a painted stroke,
then a whole slice of dense labels loaded as napari would save them), retrained and exported; the
exported segmentation's IoU on a held-out slice must improve from round 1 to round 2. A restarted
wizard resumes its session, and a bad upload gets one clear line.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from tests.system.browser import chromium_page, screenshot
from tests.system.harness import cli_env

DATA = Path(os.environ.get("DLORCH_DATA", Path(__file__).resolve().parents[3] / "shared" / "data")) / "isbi2012-em"
DOCS_IMAGES = Path(__file__).resolve().parents[2] / "docs" / "images"


def crop(tmp: Path) -> tuple[Path, np.ndarray]:
    """Three 128x128 ISBI slices (slice 2 is held out) and their dense labels."""
    d = np.load(DATA / "isbi2012_train.npz")
    image, dense = d["image"][:3, 192:320, 192:320], d["labels"][:3, 192:320, 192:320]
    np.save(tmp / "crop.npy", image)
    return tmp / "crop.npy", dense


class WizardProcess:
    """`dlorch wizard` in a subprocess: its URL from its first line of output; stopped as Ctrl-C would."""

    def __init__(self, tmp: Path, *args: str) -> None:
        self.log = open(tmp / "wizard.log", "ab")
        env = cli_env(DLORCH_HOME=str(tmp / "home"))
        self.proc = subprocess.Popen([sys.executable, "-m", "dlorch.orchestrator.cli", "wizard", *args,
                                      "--no-browser"], env=env, stdout=subprocess.PIPE, stderr=self.log, text=True)
        line: list[str] = []
        reader = threading.Thread(target=lambda: line.append(self.proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(60)
        if not line or not line[0].startswith("http"):
            self.stop()
            raise AssertionError(f"no URL from dlorch wizard: {line}\n{(tmp / 'wizard.log').read_text()}")
        self.url = line[0].strip()

    def api(self, path: str):
        with urllib.request.urlopen(self.url.rstrip("/") + path, timeout=30) as r:
            body = r.read()
            return json.loads(body) if r.headers.get("content-type", "").startswith("application/json") else body

    def labels(self, layer: str, z: int, shape: tuple[int, int]) -> np.ndarray:
        return np.frombuffer(self.api(f"/api/slice/{layer}?z={z}"), np.uint8).reshape(shape)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(90)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def until(page, js: str, timeout: float = 60, what: str = "") -> None:
    """Poll a page expression (the page's CSP forbids the eval behind wait_for_function)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if page.evaluate(js):
            return
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout}s waiting for {what or js}; message: "
                         f"{page.text_content('#message')!r}")


def open_page(page, url: str) -> None:
    page.goto(url)
    until(page, "window.wizard && window.wizard.W.state && window.wizard.W.slices.size >= 3", what="the first slice")


def drag(page, points: list[tuple[float, float]]) -> None:
    """Press the left button at the first image point, move through the rest, release."""
    at = [page.evaluate(f"window.wizard.toScreen({x}, {y})") for x, y in points]
    page.mouse.move(at[0]["x"], at[0]["y"])
    page.mouse.down()
    for p in at[1:]:
        page.mouse.move(p["x"], p["y"], steps=3)
    page.mouse.up()


def runs(labels: np.ndarray, cls: int, n: int, min_len: int, trim: int) -> list[tuple[int, int, int]]:
    """Up to ``n`` horizontal runs (y, x0, x1) of one class, ``trim`` pixels inside each end, every 6th row."""
    found = []
    for y in range(3, labels.shape[0] - 3, 6):
        row = np.concatenate([[0], (labels[y] == cls).astype(np.int8), [0]])
        edges = np.flatnonzero(np.diff(row))
        for a, b in zip(edges[::2], edges[1::2]):
            if b - a >= min_len:
                found.append((y, int(a) + trim, int(b) - 1 - trim))
    step = max(1, len(found) // n)
    return found[::step][:n]


def paint_runs(page, segments: list[tuple[int, int, int]], cls: int) -> None:
    page.click(f'#palette li[data-id="{cls}"] .swatch')
    for y, x0, x1 in segments:
        drag(page, [(x0, y), (x1, y)])


def set_brush(page, size: int) -> None:
    page.evaluate("(size) => { const s = document.getElementById('size'); s.value = size;"
                  " s.dispatchEvent(new Event('input')); }", size)


def upload(page, name: str, data: bytes) -> str:
    page.evaluate("document.getElementById('message').hidden = true")
    page.set_input_files("#labels-file", files=[{"name": name, "mimeType": "application/octet-stream",
                                                 "buffer": data}])
    until(page, "!document.getElementById('message').hidden", what=f"the answer to uploading {name}")
    return page.text_content("#message")


def npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def shot(page, name: str, docs: str | None = None) -> None:
    path = screenshot(page, name)
    if docs and os.environ.get("DLORCH_UPDATE_DOCS"):  # the README's pictures, refreshed on request
        DOCS_IMAGES.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, DOCS_IMAGES / docs)


def export_iou(page, export_dir: Path, dense: np.ndarray, before: str | None) -> float:
    """Click Export, wait for the whole stack's segmentation, and score its held-out slice (mean IoU)."""
    import tifffile

    from dlorch.core.metrics import segmentation_scores

    page.click("#export")
    until(page, f"(e => e && e.predict_job !== {json.dumps(before)} && e.status !== 'predicting')"
                "(window.wizard.W.state.export)", timeout=240, what="the export")
    assert page.evaluate("window.wizard.W.state.export.status") == "done", page.text_content("#export-files")
    seg = tifffile.imread(export_dir / "segmentation.tif")
    assert seg.shape == dense.shape
    return segmentation_scores(seg[2], dense[2])["mean_iou"]


@pytest.mark.slow
def test_wizard_paint_train_compare_pick_correct_retrain_export(tmp_path):
    image, dense = crop(tmp_path)
    export_dir = tmp_path / "export"
    wiz = WizardProcess(tmp_path, str(image), "--epochs", "6", "--export-dir", str(export_dir))
    try:
        with chromium_page(width=1280, height=900) as page:
            open_page(page, wiz.url)
            for cid, name in ((1, "membrane"), (2, "cell")):  # the palette's classes, renamed
                page.fill(f'#palette li[data-id="{cid}"] input', name)
                page.press(f'#palette li[data-id="{cid}"] input', "Enter")
            until(page, "window.wizard.W.state.classes.map(c => c.name).join() == 'membrane,cell'", what="renaming")
            # 1. Paint: strokes of two classes with the mouse, one pixel wide along the dense labels.
            set_brush(page, 1)
            membrane = runs(dense[0], 1, 24, 3, 0)
            cells = runs(dense[0], 2, 14, 12, 3)
            paint_runs(page, membrane, 1)
            paint_runs(page, cells, 2)
            until(page, "window.wizard.idle()", what="stroke acknowledgements")
            painted = wiz.labels("painted", 0, dense.shape[1:])
            assert (painted == 1).sum() >= sum(x1 - x0 + 1 for _, x0, x1 in membrane)
            assert (painted == 2).sum() >= sum(x1 - x0 + 1 for _, x0, x1 in cells)
            assert (painted[painted > 0] == dense[0][painted > 0]).all(), "a stroke landed off its pixels"
            state = wiz.api("/api/state")
            assert state["counts"]["painted"][1:3] == [int((painted == 1).sum()), int((painted == 2).sum())]
            shown = page.text_content(f'#palette li[data-id="2"] .count').replace(",", "")
            assert int(shown) == (painted == 2).sum()
            # Undo takes the last stroke away, redo puts it back, both through the server.
            before = int((painted == 2).sum())
            page.keyboard.press("Control+z")
            until(page, "window.wizard.idle()")
            assert (wiz.labels("painted", 0, dense.shape[1:]) == 2).sum() < before
            page.keyboard.press("Control+y")
            until(page, "window.wizard.idle()")
            assert (wiz.labels("painted", 0, dense.shape[1:]) == 2).sum() == before
            assert page.evaluate("Math.max(...window.wizard.roundTrips())") < 2000
            shot(page, "wizard-1-paint", "wizard-paint.png")

            # 2. Train four candidates on the local agents; 3. see four predictions side by side.
            page.click("#train")
            until(page, "document.querySelectorAll('.cand[data-status]').length == 4", timeout=180,
                  what="four candidate cards")
            shot(page, "wizard-2-train")
            until(page, "document.querySelectorAll('.cand[data-status=ready]').length == 4", timeout=300,
                  what="four candidate predictions")
            until(page, "document.querySelector('[data-card=disagreement]')", what="the disagreement view")
            nodes = {c["node"] for c in wiz.api("/api/state")["rounds"][0]["candidates"].values()}
            assert len(nodes) == 2, f"the candidates trained side by side on both agents: {nodes}"
            shot(page, "wizard-3-compare", "wizard-compare.png")
            page.click('.cand[data-variant="unet-deep"] .pick')
            until(page, "!document.getElementById('correct').hidden", what="the correction step")

            # 4. Correct: accept a box of the prediction, paint over a mistake, see where to correct next.
            page.click("#toolbar button[data-tool=box]")
            drag(page, [(60, 60), (120, 120)])
            until(page, "window.wizard.idle()")
            accepted = wiz.labels("accepted", 0, dense.shape[1:])
            assert accepted[60:120, 60:120].any() and not accepted[:60].any()
            assert not (accepted.astype(bool) & (painted > 0)).any(), "accepting never overwrites painted pixels"
            page.click("#toolbar button[data-tool=brush]")
            paint_runs(page, runs(dense[0][:, :60], 2, 2, 12, 3), 2)
            until(page, "window.wizard.idle()")
            page.click("#suggest")
            until(page, "document.querySelectorAll('#suggestions li').length > 0", what="suggested tiles")
            assert "labelled this round" in page.text_content("#labelled-round")
            shot(page, "wizard-4-correct", "wizard-correct.png")

            # 5. Export round 1's model, then correct a whole slice (labels loaded as napari saves them),
            # retrain from the chosen model, export again: the held-out slice must improve.
            iou1 = export_iou(page, export_dir, dense, None)
            first_job = page.evaluate("window.wizard.W.state.export.predict_job")
            union = np.stack([wiz.labels("painted", z, dense.shape[1:]) for z in range(3)])
            union[1] = dense[1]
            assert "loaded labels" in upload(page, "labels.npy", npy(union))
            page.click("#retrain")
            until(page, "(r => r.length == 2 && r[1].choice)(window.wizard.W.state.rounds)", timeout=240,
                  what="the retrained model's prediction")
            rnd = wiz.api("/api/state")["rounds"][1]
            assert rnd["init_from"] and rnd["accepted"], rnd
            iou2 = export_iou(page, export_dir, dense, first_job)
            shot(page, "wizard-5-export")
            print(f"held-out mean IoU: round 1 {iou1:.3f}, round 2 {iou2:.3f}")
            assert iou2 > iou1, f"held-out mean IoU did not improve: round 1 {iou1:.3f}, round 2 {iou2:.3f}"
            import tifffile
            import zarr

            assert tifffile.imread(export_dir / "labels-painted.tif").shape == dense.shape
            assert zarr.open_array(str(export_dir / "labels-accepted.zarr"), mode="r").shape == dense.shape
            assert (export_dir / "model.ckpt").stat().st_size > 0
            assert not [e for e in page.console_errors if "favicon" not in e], page.console_errors
    finally:
        wiz.stop()


@pytest.mark.slow
def test_wizard_resumes_after_restart_and_refuses_bad_uploads(tmp_path):
    image, dense = crop(tmp_path)
    wiz = WizardProcess(tmp_path, str(image), "--candidates", "2")
    try:
        with chromium_page() as page:
            open_page(page, wiz.url)
            paint_runs(page, runs(dense[0], 2, 3, 12, 3), 2)
            until(page, "window.wizard.idle()")
            message = upload(page, "labels.png", b"\x89PNG\r\n\x1a\n" + bytes(64))
            assert "not a TIFF, .npy or .npz" in message and "\n" not in message.strip()
            message = upload(page, "labels.npy", npy(np.zeros((64, 64), np.uint8)))
            assert "shape" in message and "(64, 64)" in message, message
            state = wiz.api("/api/state")
            assert state["counts"]["painted"][2] > 0
    finally:
        wiz.stop()
    wiz = WizardProcess(tmp_path, str(image), "--candidates", "2")  # the same image: the same session
    try:
        again = wiz.api("/api/state")
        assert (again["session"], again["revision"], again["counts"]) == \
               (state["session"], state["revision"], state["counts"])
        with chromium_page() as page:
            open_page(page, wiz.url)
            assert int(page.text_content('#palette li[data-id="2"] .count').replace(",", "")) == \
                   state["counts"]["painted"][2]
    finally:
        wiz.stop()
    wiz = WizardProcess(tmp_path, "--session", state["session"], "--candidates", "2")
    try:
        assert wiz.api("/api/state")["revision"] == state["revision"]
    finally:
        wiz.stop()

"""The napari dock widget in a real napari window: layers in, jobs through real local agents, result layers out.

The window is drawn on an Xvfb display with Mesa's OpenGL (``make test`` installs both), so the
canvas really renders: the test's screenshot of the window is the README's.
"""

import os
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import synthetic_pair
from tests.system.harness import Cluster

pytest.importorskip("napari")
pytest.importorskip("pytestqt")
if shutil.which("Xvfb") is None:
    pytest.skip("Xvfb is missing (make test installs it: apt-get install -y xvfb libgl1-mesa-dri)",
                allow_module_level=True)

SCREENSHOT = Path(__file__).resolve().parents[2] / "docs" / "images" / "napari-widget.png"


@pytest.fixture(scope="session")
def xvfb_display():
    """An Xvfb server on a free display number, for the session; Qt draws on it through xcb."""
    for n in range(90, 190):
        if Path(f"/tmp/.X{n}-lock").exists() or Path(f"/tmp/.X11-unix/X{n}").exists():
            continue
        proc = subprocess.Popen(["Xvfb", f":{n}", "-screen", "0", "1400x900x24", "-nolisten", "tcp"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and proc.poll() is None and not Path(f"/tmp/.X11-unix/X{n}").exists():
            time.sleep(0.1)
        if proc.poll() is None and Path(f"/tmp/.X11-unix/X{n}").exists():
            break
        proc.kill()  # another server took the number meanwhile: the next one
        proc.wait()
    else:
        pytest.fail("no free X display number in :90-:189 for Xvfb")
    saved = {k: os.environ.get(k) for k in ("DISPLAY", "QT_QPA_PLATFORM")}
    os.environ.update(DISPLAY=f":{n}", QT_QPA_PLATFORM="xcb")
    yield f":{n}"
    for k, v in saved.items():
        os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture(scope="session")
def qapp_args(xvfb_display):
    """pytest-qt's QApplication is made after the display is up (it reads DISPLAY and the platform then)."""
    return ["dlorch-napari-test"]


@pytest.mark.slow  # trains two candidates
def test_the_widget_trains_two_candidates_on_local_agents_and_adds_their_labels_as_layers(home, tmp_path, qtbot):
    import napari

    from dlorch.orchestrator.napari.widget import DlorchWidget

    img, lab = synthetic_pair(tmp_path)
    viewer = napari.Viewer(title="dlorch", show=True)
    viewer.window.resize(1400, 860)
    viewer.add_image(np.load(img), name="cells")
    viewer.add_labels(np.load(lab), name="strokes")
    try:
        with Cluster(tmp_path, home) as c:
            c.agent("a1")
            widget = DlorchWidget(viewer)
            viewer.window.add_dock_widget(widget, name="dlorch", area="right")
            assert widget.image_box.currentText() == "cells" and widget.labels_box.currentText() == "strokes"
            widget.candidates.setValue(2)
            widget.epochs.setValue(1)
            widget.run()
            assert not widget.run_button.isEnabled()  # the job runs in a worker: the event loop goes on
            qtbot.waitUntil(lambda: widget.worker is None, timeout=600_000)
            assert widget.status.text().startswith("done"), widget.status.text()
            names = [layer.name for layer in viewer.layers]
            added = [n for n in names if n.startswith("dlorch ")]
            assert len(added) == 2 and all(" IoU " in n for n in added), names
            for name in added:
                data = viewer.layers[name].data
                assert data.shape == np.load(img).shape and set(np.unique(data)) <= {1, 2}
            assert widget.jobs_table.rowCount() >= 4  # two trainings, two predictions
            assert widget.nodes_table.rowCount() >= 1
            viewer.layers["strokes"].visible = False  # the image under the best candidate's labels
            for name in added[1:]:
                viewer.layers[name].visible = False
            viewer.layers[added[0]].opacity = 0.45
            viewer.reset_view()
            canvas = viewer.screenshot(canvas_only=True, flash=False)
            # a rendered canvas (OpenGL through Mesa), not a blank one: grey cells under two label colours
            colours = np.unique(canvas[..., :3].reshape(-1, 3), axis=0)
            assert canvas.std() > 10 and len(colours) > 20, (canvas.std(), len(colours))
            window = viewer.screenshot(canvas_only=False, flash=False)
            SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
            from PIL import Image

            Image.fromarray(window).save(SCREENSHOT)
    finally:
        viewer.close()

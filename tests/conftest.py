"""What unit and system tests share: the repository root, a free port, a small synthetic image with strokes."""

from __future__ import annotations

import socket
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def synthetic_pair(tmp: Path, shape=(2, 64, 64), seed: int = 0) -> tuple[Path, Path]:
    """A small image of bright discs on a dark background, with a few painted strokes per class."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[: shape[-2], : shape[-1]]
    image = np.zeros(shape, np.float32)
    truth = np.ones(shape, np.uint8)
    for z in range(shape[0]):
        for _ in range(4):
            cy, cx, r = rng.integers(10, shape[-2] - 10), rng.integers(10, shape[-1] - 10), rng.integers(5, 9)
            disc = (yy - cy) ** 2 + (xx - cx) ** 2 < r**2
            image[z][disc] = 1.0
            truth[z][disc] = 2
    image = (image * 150 + 50 + rng.normal(0, 20, shape)).clip(0, 255).astype(np.uint8)
    labels = np.zeros(shape, np.uint8)
    keep = rng.random(shape) < 0.05
    labels[keep] = truth[keep]
    ipath, lpath = tmp / "image.npy", tmp / "labels.npy"
    np.save(ipath, image)
    np.save(lpath, labels)
    return ipath, lpath


class _RunsCode:
    """Unpickles as ``open(marker, "w")``: the stand-in for any code a planted checkpoint could run."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def code_checkpoint(path: Path, marker: Path, base: Path | None = None, raw: bool = False) -> Path:
    """A checkpoint that creates ``marker`` when it is unpickled with pickle's full powers.

    It holds ``base``'s contents (a real checkpoint, so nothing else gives it away) and one more entry
    that runs code; written by ``torch.save``, or as a bare pickle (torch's legacy format) when ``raw``.
    """
    import pickle

    import torch

    contents = torch.load(base, map_location="cpu", weights_only=True) if base else {"state_dict": {}}
    contents["extra"] = _RunsCode(marker)
    if raw:
        path.write_bytes(pickle.dumps(contents))
    else:
        torch.save(contents, path)
    return path


def pytest_runtest_logreport(report) -> None:
    """With DLORCH_TEST_TIMES=PATH, each test's phase, outcome and seconds are appended to PATH as they finish.

    A line per phase survives a run that is stopped part-way (``--durations`` prints only at the end).
    """
    import os

    path = os.environ.get("DLORCH_TEST_TIMES")
    if path and (report.when == "call" or report.outcome != "passed"):
        with open(path, "a") as f:
            f.write(f"{report.duration:9.2f} {report.outcome:8} {report.when:8} {report.nodeid}\n")

"""Shared fixtures: a real redis-server on a free port, an isolated dlorch home, CLI runners."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """A redis-server process this test owns, so it can kill it (and restart it empty)."""

    def __init__(self, tmp: Path) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            pytest.fail("redis-server is not on PATH: apt-get install -y redis-server (`make test` does it)")
        self.exe, self.tmp, self.port = exe, tmp, free_port()
        self.proc: subprocess.Popen | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen([self.exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "no", "--dir", str(self.tmp)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def redis_server(tmp_path):
    server = RedisServer(tmp_path)
    yield server
    server.kill()


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """An isolated embedded-default state directory, also exported for subprocesses."""
    h = tmp_path / "dlorch-home"
    monkeypatch.setenv("DLORCH_HOME", str(h))
    for var in ("DLORCH_STORE", "DLORCH_QUEUE", "DLORCH_SECRET"):
        monkeypatch.delenv(var, raising=False)
    return h


def cli_env(**extra: str) -> dict[str, str]:
    env = {**os.environ, **extra}
    env.setdefault("DLORCH_HEARTBEAT_S", "1")
    env.setdefault("DLORCH_THREADS", "1")
    return env


def dlorch(*args: str, env: dict | None = None, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
    """Run the real ``dlorch`` CLI in a subprocess."""
    cp = subprocess.run([sys.executable, "-m", "dlorch.orchestrator.cli", *args], env=env or cli_env(),
                        capture_output=True, text=True, timeout=timeout)
    if check and cp.returncode != 0:
        raise AssertionError(f"dlorch {' '.join(args)} -> {cp.returncode}\n{cp.stdout}\n{cp.stderr}")
    return cp


def spawn(*args: str, env: dict | None = None, log: Path | None = None) -> subprocess.Popen:
    """Start a long-running ``dlorch`` process (service or agent)."""
    out = open(log, "ab") if log else subprocess.DEVNULL
    return subprocess.Popen([sys.executable, "-m", "dlorch.orchestrator.cli", *args], env=env or cli_env(),
                            stdout=out, stderr=subprocess.STDOUT)


def job_json(job_id: str, env: dict | None = None) -> dict:
    return json.loads(dlorch("status", job_id, "--json", env=env).stdout)


def wait_for(pred, timeout: float = 120, every: float = 0.3, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = pred()
        if got:
            return got
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


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


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A small trained checkpoint, made in-process once for the module."""
    from dlorch.core.engine.hooks import NoHooks
    from dlorch.core.engine.segment import plan_segmentation, train_segmentation

    tmp = tmp_path_factory.mktemp("model")
    img, lab = synthetic_pair(tmp)
    image, labels = np.load(img), np.load(lab)
    plan = plan_segmentation(image, labels, epochs=1)
    return train_segmentation(image, labels, plan, workdir=tmp / "w", resume_from=None, hooks=NoHooks()).checkpoint


@pytest.fixture
def s3(monkeypatch):
    """moto's S3 server over HTTP with a bucket named "bucket"; the AWS variables point at it."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    env = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    import boto3

    boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"]).create_bucket(Bucket="bucket")
    yield env
    server.stop()

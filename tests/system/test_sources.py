"""A node reads and writes only its store and the prefixes its deployment allows, whatever a spec names.

The specs here go over the queue directly, as a client holding the queue's key (or a buggy one) could
send them, past the CLI that uploads local files.
"""

import http.server
import threading

import numpy as np
import pytest
import zarr

from dlorch.core.settings import Settings
from dlorch.orchestrator.client import Client
from tests.conftest import free_port, synthetic_pair
from tests.system.harness import Cluster


class _Recorder(http.server.SimpleHTTPRequestHandler):
    seen: list[str] = []

    def do_GET(self):
        self.seen.append(f"GET {self.path}")
        super().do_GET()

    def do_HEAD(self):
        self.seen.append(f"HEAD {self.path}")
        super().do_HEAD()

    def log_message(self, *args):
        pass


@pytest.fixture
def web(tmp_path):
    """An HTTP server this test starts, serving tmp_path/www and recording every request it gets."""
    root = tmp_path / "www"
    (root / "data").mkdir(parents=True)
    (root / "latest" / "meta-data").mkdir(parents=True)
    (root / "latest" / "meta-data" / "secret.npy").write_bytes(b"credentials")
    handler = type("Handler", (_Recorder,), {"seen": []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()),
                                             lambda *a: handler(*a, directory=str(root)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}", root, handler.seen
    server.shutdown()


def _denoise(image: str) -> dict:
    return {"kind": "denoise", "task": "denoising", "image": image, "epochs": 1}


def test_a_spec_naming_local_files_or_metadata_urls_is_refused_by_the_node_without_a_read(home, tmp_path, web):
    url, root, seen = web
    img, _ = synthetic_pair(tmp_path)
    (root / "data" / "img.npy").write_bytes(img.read_bytes())
    forbidden = ["/etc/passwd", "file:///etc/passwd", f"{url}/latest/meta-data/secret.npy",
                 "http://169.254.169.254/latest/meta-data/iam/x.npy", f"{url}/data/../latest/meta-data/secret.npy",
                 f"{home}/../outside.npy"]
    with Cluster(tmp_path, home, DLORCH_ALLOW_URLS=f"{url}/data/") as c:
        c.agent("a1")
        client = Client(Settings())
        refused = [client.submit(_denoise(ref)) for ref in forbidden]
        allowed = client.submit(_denoise(f"{url}/data/img.npy"))  # under the allowed prefix: read and trained on
        for jid, ref in zip(refused, forbidden):
            job = c.wait_job(jid, lambda j: j["status"] in ("succeeded", "failed"), 120)
            assert job["status"] == "failed" and len(job["attempts"]) == 1, job  # permanent: never retried
            assert job["error"].startswith(f"refused to read {ref}: nodes read only the store"), job["error"]
            assert "DLORCH_ALLOW_URLS" in job["error"] and "\n" not in job["error"]
        assert c.wait_job(allowed, lambda j: j["status"] in ("succeeded", "failed"), 300)["status"] == "succeeded"
    assert seen and all(s.split()[1] == "/data/img.npy" for s in seen), seen  # the refused URLs got no request


def test_a_blockwise_spec_writing_outside_the_store_is_refused_before_anything_is_written(home, tmp_path, model):
    vol = tmp_path / "in.zarr"
    zarr.create_array(str(vol), shape=(2, 64, 64), chunks=(1, 64, 64), dtype="uint8")[...] = \
        np.random.default_rng(0).integers(0, 255, (2, 64, 64), dtype=np.uint8)
    elsewhere = tmp_path / "elsewhere"
    with Cluster(tmp_path, home) as c:
        c.agent("a1")
        client = Client(Settings())
        image, ckpt = client.store.put_blob(vol), client.store.put_blob(model)  # as the CLI uploads them
        spec = {"kind": "predict", "image": image, "model": ckpt, "output_format": "zarr"}
        out = f"file://{elsewhere}/out.zarr"
        bad = client.submit({**spec, "output": out})
        job = c.wait_job(bad, lambda j: j["status"] in ("succeeded", "failed"), 120)
        assert job["status"] == "failed" and job["error"].startswith(f"refused to write {out}: "), job
        good = client.submit(spec)  # the default output, in the store
        assert c.wait_job(good, lambda j: j["status"] in ("succeeded", "failed"), 300)["status"] == "succeeded"
    assert not elsewhere.exists()

"""The web pages' guard: Host (DNS rebinding), Origin (cross-site posts), token and cookie, upload checks."""

from __future__ import annotations

import io
import socket
import zipfile

import numpy as np
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from dlorch.core.errors import BadInput
from dlorch.orchestrator.web.security import (Access, Guard, UploadLimits, UploadRefused, cookie_name, read_upload,
                                              sniff)
from dlorch.orchestrator.web.server import WebServer


def _app() -> FastAPI:
    app = FastAPI()

    @app.get("/")
    def root():
        return {"page": "home"}

    @app.post("/act")
    def act():
        return {"done": True}

    return app


def _client(access: Access, host: str = "127.0.0.1:8470") -> TestClient:
    return TestClient(Guard(_app(), access), base_url=f"http://{host}", follow_redirects=False)


def test_loopback_bind_needs_no_token_and_refuses_a_rebinding_host():
    access = Access.for_bind("127.0.0.1")
    assert access.token is None
    c = _client(access)
    r = c.get("/")
    assert r.status_code == 200 and r.json() == {"page": "home"}
    assert r.headers["x-frame-options"] == "DENY" and "default-src 'self'" in r.headers["content-security-policy"]
    assert c.get("/", headers={"host": "localhost:8470"}).status_code == 200
    # A page of attacker.example whose DNS now points at 127.0.0.1: the browser still says its own name.
    r = c.get("/", headers={"host": "attacker.example:8470"})
    assert r.status_code == 421 and "Host" in r.json()["detail"]
    assert c.get("/", headers={"host": ""}).status_code == 421


def test_a_cross_origin_post_is_refused_and_a_same_origin_one_accepted():
    c = _client(Access.for_bind("127.0.0.1"))
    r = c.post("/act", headers={"origin": "http://attacker.example"})
    assert r.status_code == 403 and "another site" in r.json()["detail"]
    assert c.post("/act", headers={"origin": "http://127.0.0.1:9999"}).status_code == 403  # another port: another origin
    assert c.post("/act", headers={"origin": "null"}).status_code == 403  # a sandboxed frame or a file:// page
    # A browser that left Origin out still says the request crossed sites.
    assert c.post("/act", headers={"sec-fetch-site": "cross-site"}).status_code == 403
    assert c.post("/act", headers={"origin": "http://127.0.0.1:8470"}).json() == {"done": True}
    assert c.post("/act").status_code == 200  # curl, a script: no page involved
    assert c.get("/", headers={"origin": "http://attacker.example"}).status_code == 200  # reads are not mutations


def test_a_non_loopback_bind_requires_the_token():
    for bind in ("0.0.0.0", "10.1.2.3", "::"):
        assert Access.for_bind(bind).token, bind
    assert Access.for_bind("localhost").token is None and Access.for_bind("::1").token is None
    assert Access.for_bind("0.0.0.0").token != Access.for_bind("0.0.0.0").token  # random each time

    access = Access.for_bind("0.0.0.0")
    c = _client(access, host="10.1.2.3:8470")
    r = c.get("/")
    assert r.status_code == 401 and "?token=" in r.json()["detail"]
    assert c.post("/act", headers={"origin": "http://10.1.2.3:8470"}).status_code == 401
    assert c.get("/?token=wrong").status_code == 403


def test_the_token_unlocks_with_an_httponly_strict_cookie():
    access = Access.for_bind("0.0.0.0")
    c = _client(access, host="10.1.2.3:8470")
    r = c.get(f"/?token={access.token}&job=j-1")
    assert r.status_code == 303 and r.headers["location"] == "/?job=j-1"  # the token leaves the address bar
    cookie = r.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and access.token not in cookie
    assert c.get("/").json() == {"page": "home"}  # the client kept the cookie
    assert c.post("/act", headers={"origin": "http://10.1.2.3:8470"}).json() == {"done": True}
    assert c.post("/act", headers={"origin": "http://attacker.example"}).status_code == 403  # cookie or not
    # Another server's cookie (or a forged one) does not unlock this one.
    fresh = _client(access, host="10.1.2.3:8470")
    fresh.cookies.set(cookie_name(8470), "0" * 64)
    assert fresh.get("/").status_code == 401
    # Scripts send the token as a bearer.
    assert fresh.get("/", headers={"authorization": f"Bearer {access.token}"}).status_code == 200
    assert fresh.get("/", headers={"authorization": "Bearer nope"}).status_code == 401


def test_wildcard_bind_answers_ip_hosts_and_its_own_names_only():
    access = Access.for_bind("0.0.0.0")
    assert access.host_allowed("192.168.0.7:8470") and access.host_allowed("[fe80::1]:8470")
    assert access.host_allowed(f"{socket.gethostname()}:8470")
    assert not access.host_allowed("attacker.example:8470")
    assert Access.for_bind("10.1.2.3", extra_hosts=("dlorch.lab.example",)).host_allowed("dlorch.lab.example")
    assert not Access.for_bind("10.1.2.3").host_allowed("192.168.0.7")  # a specific bind: its own address only


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=True)
    return buf.getvalue()


def test_uploads_are_typed_by_magic_bytes_and_shape_checked_from_the_header():
    img = np.arange(64 * 64, dtype=np.uint16).reshape(64, 64)
    assert (read_upload(_npy(img)) == img).all()
    import tifffile

    buf = io.BytesIO()
    tifffile.imwrite(buf, img)
    assert sniff(buf.getvalue()) == "tiff" and (read_upload(buf.getvalue()) == img).all()

    with pytest.raises(UploadRefused, match="not a TIFF, .npy or .npz") as e:
        read_upload(b"<html>" + bytes(100))
    assert e.value.status == 415 and isinstance(e.value, BadInput)
    with pytest.raises(UploadRefused, match="not numbers"):  # a pickle is never loaded
        read_upload(_npy(np.array([{"a": 1}], dtype=object)))
    with pytest.raises(UploadRefused, match="2D to 4D"):
        read_upload(_npy(np.zeros(5, np.uint8)))
    with pytest.raises(UploadRefused, match="over the cap") as e:
        read_upload(_npy(img), limits=UploadLimits(max_bytes=1000))
    assert e.value.status == 413


def test_a_decompression_bomb_is_refused_before_it_is_decoded():
    # An .npz whose one member claims 2**40 voxels (a few bytes compressed): only its header is read.
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "|u1", "fortran_order": False, "shape": (1 << 20, 1 << 20)})
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("image.npy", b"\x93NUMPY\x01\x00" + header.getvalue()[8:] + bytes(1000))
    with pytest.raises(UploadRefused, match="voxels, over the cap") as e:
        read_upload(buf.getvalue(), limits=UploadLimits(max_voxels=1 << 24))
    assert e.value.status == 413


def test_a_port_in_use_is_one_line():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        with pytest.raises(BadInput, match=f"port {port} on 127.0.0.1 is in use.*--port 0"):
            WebServer(_app(), "127.0.0.1", port).start()

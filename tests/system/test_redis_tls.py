"""Redis over TLS with AUTH (rediss://): a job end to end through a redis-server that speaks only TLS and wants a
password, the password nowhere (logs, ledger, uploaded logs, CLI output), a certificate for another host refused."""

from __future__ import annotations

import datetime
import ipaddress
import json
import shutil
import socket
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from tests.conftest import free_port, synthetic_pair
from tests.system.harness import Cluster, cli_env, dlorch


def _certificates(tmp: Path) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1/localhost, and one for another host, signed by the CA."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dlorch test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    out = {"ca": tmp / "ca.pem"}
    out["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    for name, sans in (("server", [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]),
                       ("other", [x509.DNSName("queue.other.example")])):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])).issuer_name(ca_name)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
                .add_extension(x509.SubjectAlternativeName(sans), critical=False)
                .sign(ca_key, hashes.SHA256()))
        out[f"{name}_cert"], out[f"{name}_key"] = tmp / f"{name}.pem", tmp / f"{name}.key"
        out[f"{name}_cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        out[f"{name}_key"].write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                         serialization.PrivateFormat.TraditionalOpenSSL,
                                                         serialization.NoEncryption()))
        out[f"{name}_key"].chmod(0o600)
    return out


class TlsRedis:
    """A redis-server on a TLS port only (no plain port), with a password."""

    def __init__(self, tmp: Path, certs: dict[str, Path], which: str, password: str) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            pytest.fail("redis-server is not on PATH: apt-get install -y redis-server (`make test` does it)")
        self.port = free_port()
        self.proc = subprocess.Popen(
            [exe, "--port", "0", "--tls-port", str(self.port), "--bind", "127.0.0.1",
             "--tls-cert-file", str(certs[f"{which}_cert"]), "--tls-key-file", str(certs[f"{which}_key"]),
             "--tls-ca-cert-file", str(certs["ca"]), "--tls-auth-clients", "no", "--requirepass", password,
             "--save", "", "--appendonly", "no", "--dir", str(tmp)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"redis-server did not start with TLS: {self.proc.stderr.read().decode()[-300:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


@pytest.fixture
def tls(tmp_path):
    password = f"pw-{uuid.uuid4().hex}"
    certs = _certificates(tmp_path)
    servers = {which: TlsRedis(tmp_path, certs, which, password) for which in ("server", "other")}
    yield password, certs, servers
    for s in servers.values():
        s.close()


def _url(password: str, port: int, ca: Path) -> str:
    return f"rediss://:{password}@127.0.0.1:{port}/0?ssl_ca_certs={ca}"


@pytest.mark.slow
def test_a_job_runs_end_to_end_over_tls_and_the_password_is_nowhere(tls, home, tmp_path):
    password, certs, servers = tls
    url = _url(password, servers["server"].port, certs["ca"])
    img, lab = synthetic_pair(tmp_path)
    with Cluster(tmp_path, home, DLORCH_QUEUE=url, DLORCH_SECRET="tls-test-hmac-key") as c:
        c.agent("tls-agent")
        jid = c.submit("segment", str(img), "--labels", str(lab), "-o", str(tmp_path / "seg.tif"), "--epochs", "1")
        job = c.wait_job(jid, lambda j: j["status"] in ("succeeded", "failed"), 240, what="the job over TLS")
        assert job["status"] == "succeeded", job.get("error")
        outputs = [c.cli(*args).stdout for args in (("nodes",), ("status", jid, "--json"))]
    assert "tls-agent" in outputs[0] and json.loads(outputs[1])["node"] == "tls-agent"  # it ran over TLS
    attempt_log = home / "jobs" / jid / "attempts" / "1" / "log.txt"
    assert attempt_log.exists()  # the agent's uploaded log, one of the files searched below
    assert "rediss://:***@127.0.0.1" in (tmp_path / "up.log").read_text()  # the queue is named, redacted
    leaks = [f"CLI output {i}" for i, text in enumerate(outputs) if password in text]
    for log in (tmp_path / "up.log", tmp_path / "tls-agent.log"):  # stderr and stdout of orchestrator and agent
        if password in log.read_text(errors="replace"):
            leaks.append(str(log))
    for path in home.rglob("*"):  # ledger records, uploaded logs, checkpoints, outputs, node state
        if path.is_file() and password.encode() in path.read_bytes():
            leaks.append(str(path.relative_to(home)))
    assert not leaks, f"the Redis password appears in {leaks}"


def test_a_certificate_for_another_host_is_refused_in_one_line(tls, home):
    password, certs, servers = tls
    from dlorch.core.errors import Unreachable
    from dlorch.core.wire import Signer
    from dlorch.orchestrator.queue import Queue

    other = _url(password, servers["other"].port, certs["ca"])
    with pytest.raises(Unreachable) as refused:
        Queue(other, Signer(b"k")).jobs.send({"job": "j-1", "token": 1})
    line = str(refused.value)
    assert "\n" not in line and password not in line
    assert "TLS certificate was refused" in line and "ssl_ca_certs" in line, line
    # the same CA and password, the right host: accepted (so the refusal above was the host name's)
    ok = Queue(_url(password, servers["server"].port, certs["ca"]), Signer(b"k"))
    ok.jobs.send({"job": "j-1", "token": 1})
    assert ok.jobs.receive(timeout=2) == {"job": "j-1", "token": 1}
    # through the CLI: one line on stderr, a non-zero status, no traceback, no password
    cp = dlorch("nodes", check=False, env=cli_env(DLORCH_QUEUE=other, DLORCH_SECRET="k"))
    assert cp.returncode != 0 and "Traceback" not in cp.stderr
    assert [line for line in cp.stderr.splitlines() if line.startswith("error:")], cp.stderr
    assert password not in cp.stdout + cp.stderr


def test_a_wrong_password_or_a_plain_connection_is_refused(tls, home):
    password, certs, servers = tls
    from dlorch.core.errors import Unreachable
    from dlorch.core.wire import Signer
    from dlorch.orchestrator.queue import Queue

    def refusal(url: str) -> str:
        with pytest.raises(Unreachable) as refused:
            Queue(url, Signer(b"k")).jobs.send({"job": "j-1", "token": 1})
        return str(refused.value)

    port = servers["server"].port
    wrong = refusal(_url("not-the-password", port, certs["ca"]))
    assert "refused its password" in wrong and "not-the-password" not in wrong
    # plain redis:// to the TLS-only port: refused, the password not repeated
    assert password not in refusal(f"redis://:{password}@127.0.0.1:{port}/0")

"""A throwaway etcd for tests and benchmarks: Debian's etcd-server on loopback with a
temporary data dir."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from vppmesh.lab.testbed import TestbedError

START_TIMEOUT = 20.0


def etcd_binary() -> str | None:
    return shutil.which("etcd")


NO_ETCD = "no etcd: apt-get install etcd-server (Debian) to run the datastore tests"


def require_etcd() -> str:
    found = etcd_binary()
    if found is None:
        raise TestbedError(NO_ETCD)
    return found


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class TlsFiles:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, all PEM."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def make_tls(directory: Path, host: str = "127.0.0.1") -> TlsFiles:
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)

    def write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> Path:
        path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
        path.chmod(0o600)
        return path

    def cert(name: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Name,
             signer: ec.EllipticCurvePrivateKey, *, ca: bool = False,
             server: bool = False) -> x509.Certificate:
        builder = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
                   .issuer_name(issuer).public_key(key.public_key())
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), True))
        if not ca:
            # etcd's HTTP gateway dials etcd itself with the server certificate, so
            # that one must be good for client authentication too.
            usages = [ExtendedKeyUsageOID.CLIENT_AUTH]
            if server:
                usages.append(ExtendedKeyUsageOID.SERVER_AUTH)
            builder = builder.add_extension(x509.ExtendedKeyUsage(usages), False)
        if server:
            builder = builder.add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address(host))]), False)
        return builder.sign(signer, hashes.SHA256())

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "vppmesh test CA")])
    ca_cert = cert("vppmesh test CA", ca_key, ca_name, ca_key, ca=True)
    out: dict[str, Path] = {"ca": directory / "ca.pem"}
    out["ca"].write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    for role in ("server", "client"):
        key = ec.generate_private_key(ec.SECP256R1())
        signed = cert(f"etcd-{role}", key, ca_name, ca_key, server=role == "server")
        out[f"{role}_cert"] = directory / f"{role}.pem"
        out[f"{role}_cert"].write_bytes(signed.public_bytes(serialization.Encoding.PEM))
        out[f"{role}_key"] = write_key(key, directory / f"{role}-key.pem")
    return TlsFiles(**out)


@dataclass(frozen=True)
class EtcdServer:
    host: str
    port: int
    process: subprocess.Popen[bytes]
    data_dir: Path
    tls: TlsFiles | None = None

    def url(self, prefix: str = "/vppmesh") -> str:
        if self.tls is None:
            return f"etcd://{self.host}:{self.port}{prefix}"
        return (f"etcds://{self.host}:{self.port}{prefix}?ca={self.tls.ca}"
                f"&cert={self.tls.client_cert}&key={self.tls.client_key}")


@contextmanager
def running_etcd(host: str = "127.0.0.1", *, wrap: Sequence[str] = (),
                 data_dir: Path | None = None, tls: bool = False,
                 ports: tuple[int, int] | None = None) -> Iterator[EtcdServer]:
    """Start etcd (optionally through `wrap`, e.g. `ip netns exec NS`); stop it after."""
    own_dir = data_dir is None
    data = Path(tempfile.mkdtemp(prefix="vppmesh-etcd-")) if data_dir is None else data_dir
    data.mkdir(parents=True, exist_ok=True)
    port, peer = ports or ((free_port(), free_port()) if not wrap else (2379, 2380))
    files = make_tls(data, host) if tls else None
    server = start_etcd(host, wrap=wrap, data_dir=data, ports=(port, peer), tls=files)
    try:
        yield server
    finally:
        stop_etcd(server)
        if own_dir:
            shutil.rmtree(data, ignore_errors=True)


def start_etcd(host: str, *, wrap: Sequence[str], data_dir: Path, ports: tuple[int, int],
               tls: TlsFiles | None = None) -> EtcdServer:
    """etcd on `data_dir` (started again on the same directory, it keeps its keys and
    leases), answering on its client URL; its output appended to data_dir/etcd.log."""
    binary = require_etcd()
    port, peer = ports
    scheme = "https" if tls else "http"
    client_url, peer_url = f"{scheme}://{host}:{port}", f"http://{host}:{peer}"
    tls_args = [] if tls is None else [
        "--cert-file", str(tls.server_cert), "--key-file", str(tls.server_key),
        "--trusted-ca-file", str(tls.ca), "--client-cert-auth"]
    with open(data_dir / "etcd.log", "a") as log:
        proc = subprocess.Popen(
            [*wrap, binary, "--name", "vppmesh-test", "--data-dir", str(data_dir / "data"),
             "--listen-client-urls", client_url, "--advertise-client-urls", client_url,
             "--listen-peer-urls", peer_url, "--initial-advertise-peer-urls", peer_url,
             "--initial-cluster", f"vppmesh-test={peer_url}", "--log-outputs", "stderr",
             *tls_args],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    server = EtcdServer(host=host, port=port, process=proc, data_dir=data_dir, tls=tls)
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"etcd exited: {(data_dir / 'etcd.log').read_text()[-2000:]}")
        if not wrap and _healthy(client_url, tls):
            return server
        if wrap and _healthy_via(wrap, client_url):
            return server
        if time.monotonic() > deadline:
            stop_etcd(server)
            raise RuntimeError(f"etcd did not answer on {client_url} within "
                               f"{START_TIMEOUT:.0f} s")
        time.sleep(0.2)


def stop_etcd(server: EtcdServer, sig: int = signal.SIGTERM) -> None:
    """Signal etcd (SIGKILL after 10 s) and reap it."""
    if server.process.poll() is None:
        server.process.send_signal(sig)
    try:
        server.process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        server.process.kill()
        server.process.wait()


def _healthy(url: str, tls: TlsFiles | None = None) -> bool:
    context = None
    if tls is not None:
        import ssl

        context = ssl.create_default_context(cafile=str(tls.ca))
        context.load_cert_chain(str(tls.client_cert), str(tls.client_key))
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=1, context=context) as reply:
            return b"true" in reply.read()
    except OSError:
        return False


def _healthy_via(wrap: Sequence[str], url: str) -> bool:
    code = ("import sys, urllib.request\n"
            f"print(urllib.request.urlopen({url + '/health'!r}, timeout=1).read())")
    probe = subprocess.run([*wrap, sys.executable, "-c", code], capture_output=True,
                           check=False)
    return b"true" in probe.stdout

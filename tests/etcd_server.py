"""A throwaway etcd for tests: Debian's etcd-server on loopback with a temporary data dir."""

from __future__ import annotations

import shutil
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

import pytest

START_TIMEOUT = 20.0


def etcd_binary() -> str | None:
    return shutil.which("etcd")


def require_etcd() -> str:
    found = etcd_binary()
    if found is None:
        pytest.skip("no etcd: apt-get install etcd-server (Debian) to run the datastore tests")
    return found


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class EtcdServer:
    host: str
    port: int
    process: subprocess.Popen[bytes]
    data_dir: Path

    def url(self, prefix: str = "/vppmesh") -> str:
        return f"etcd://{self.host}:{self.port}{prefix}"


@contextmanager
def running_etcd(host: str = "127.0.0.1", *, wrap: Sequence[str] = (),
                 data_dir: Path | None = None) -> Iterator[EtcdServer]:
    """Start etcd (optionally through `wrap`, e.g. `ip netns exec NS`); stop it after."""
    binary = require_etcd()
    own_dir = data_dir is None
    data = Path(tempfile.mkdtemp(prefix="vppmesh-etcd-")) if data_dir is None else data_dir
    port = free_port() if not wrap else 2379
    peer = free_port() if not wrap else 2380
    client_url, peer_url = f"http://{host}:{port}", f"http://{host}:{peer}"
    log = open(data / "etcd.log", "w")  # noqa: SIM115 - handed to the child
    proc = subprocess.Popen(
        [*wrap, binary, "--name", "vppmesh-test", "--data-dir", str(data / "data"),
         "--listen-client-urls", client_url, "--advertise-client-urls", client_url,
         "--listen-peer-urls", peer_url, "--initial-advertise-peer-urls", peer_url,
         "--initial-cluster", f"vppmesh-test={peer_url}", "--log-outputs", "stderr"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    server = EtcdServer(host=host, port=port, process=proc, data_dir=data)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"etcd exited: {(data / 'etcd.log').read_text()[-2000:]}")
            if not wrap and _healthy(client_url):
                break
            if wrap and _healthy_via(wrap, client_url):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"etcd did not answer on {client_url} within "
                                   f"{START_TIMEOUT:.0f} s")
            time.sleep(0.2)
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        if own_dir:
            shutil.rmtree(data, ignore_errors=True)


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=1) as reply:
            return b"true" in reply.read()
    except OSError:
        return False


def _healthy_via(wrap: Sequence[str], url: str) -> bool:
    code = ("import sys, urllib.request\n"
            f"print(urllib.request.urlopen({url + '/health'!r}, timeout=1).read())")
    probe = subprocess.run([*wrap, sys.executable, "-c", code], capture_output=True,
                           check=False)
    return b"true" in probe.stdout

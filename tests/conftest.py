"""Shared fixtures: meshes with real keys, and the real-VPP switch."""

from __future__ import annotations

import hashlib
import ipaddress
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

sys.path.insert(0, str(Path(__file__).parent))

from benchmarks.netns import stop_process
from vppmesh.config import Mesh, MeshSettings, Node
from vppmesh.keys import NodeSecrets, public_key_b64

# Assertions in the shared real-VPP helpers are reported like those in the tests.
pytest.register_assert_rewrite("vpp_helpers")


def make_mesh(n: int, tunnels: int = 2, **settings: object) -> tuple[Mesh, dict[str, NodeSecrets]]:
    secrets: dict[str, NodeSecrets] = {}
    nodes = []
    for i in range(1, n + 1):
        key = X25519PrivateKey.from_private_bytes(hashlib.sha256(b"node%d" % i).digest())
        name = f"node{i}"
        secrets[name] = NodeSecrets(private_key=key)
        base = int(ipaddress.IPv4Address("10.0.0.0")) + i * 16
        nodes.append(Node(
            name=name, node_number=i,
            underlay=[ipaddress.IPv4Interface(f"{ipaddress.IPv4Address(base + t + 1)}/12")
                      for t in range(tunnels)],
            pod_cidr=ipaddress.IPv4Network(f"10.{64 + i // 256}.{i % 256}.0/24"),
            public_key=public_key_b64(key),
        ))
    mesh = Mesh(settings=MeshSettings(tunnels_per_peer=tunnels, **settings),  # type: ignore[arg-type]
                nodes=nodes)
    return mesh, secrets


@pytest.fixture
def mesh3() -> tuple[Mesh, dict[str, NodeSecrets]]:
    return make_mesh(3)


def vpp_binary() -> str | None:
    from vppmesh.lab.testbed import TestbedError, find_vpp

    try:
        return str(find_vpp())
    except TestbedError:
        return None


def require_vpp() -> None:
    if vpp_binary() is None:
        pytest.skip("no VPP: set VPPMESH_VPP to a vpp binary or put vpp on PATH "
                    "(install from FD.io's packages)")
    if os.geteuid() != 0:
        pytest.skip("the VPP tests create network namespaces and need root")


def wait_for(condition: Callable[[], bool], timeout: float, what: str,
             interval: float = 0.1) -> float:
    """Poll until `condition` holds; returns the seconds it took, fails naming `what`."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)
    return time.monotonic() - started


def record_raw_replies(channel: object, monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """Keep every raw message an API channel reads from now on (to decode them again with
    vpp-papi and compare)."""
    raws: list[bytes] = []
    read = channel._read_message  # type: ignore[attr-defined]

    def keep() -> bytes:
        raw = read()
        raws.append(raw)
        return raw

    monkeypatch.setattr(channel, "_read_message", keep)
    return raws


@pytest.fixture(autouse=True, scope="session")
def core_dumps_left_to_pytest() -> Iterator[None]:
    """Every process that loads a private key forbids its own core dumps
    (vppmesh/hardening.py); the tests load keys in pytest's own process, which stays as
    it was (test_keys checks the real thing in a subprocess)."""
    from vppmesh import hardening

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(hardening, "forbid_core_dumps", lambda: None)
        yield


__all__ = ["make_mesh", "record_raw_replies", "require_vpp", "stop_process", "vpp_binary",
           "wait_for"]

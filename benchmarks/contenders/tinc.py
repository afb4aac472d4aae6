"""tinc (Debian's package), router mode, one tincd per node namespace.

Cipher choice: tinc 1.0 encrypts UDP packets through OpenSSL's plain EVP cipher interface
and has no AEAD handling (no tag is produced or checked, the IV is set once per key).
With ``Cipher = aes-256-gcm`` tinc 1.0.36 starts, but its UDP packets are never accepted
by the peer (checked on Debian 12 / OpenSSL 3: pod-to-pod ping fails). Its strongest
working setting is ``aes-256-cbc`` with HMAC-SHA256 (``Digest = sha256``) at full length
(``MACLength = 32``; tinc 1.0's default is a 4-byte MAC). tinc 1.1 replaces all this with
its own SPTPS protocol (ChaCha20-Poly1305), so no cipher is configured there.

Path MTU discovery is turned off and the path MTU pinned instead: with discovery on,
tinc 1.0 sends every packet larger than the MTU it has confirmed so far over its TCP
meta connection, so the first seconds of a test would measure TCP-in-TCP rather than
tinc's UDP data path.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

from benchmarks import netns
from benchmarks.contenders.base import Contender
from benchmarks.iperf import tool_version
from benchmarks.topology import Side, Topology

TINC_PORT = 655
TUNNEL_MTU = 1400
RSA_BITS = 2048


def parse_tinc_version(text: str) -> tuple[int, int, int] | None:
    """``(1, 0, 36)`` from ``tinc version 1.0.36``; ``None`` if not recognised."""
    m = re.search(r"tinc version (\d+)\.(\d+)(?:\.(\d+))?", text)
    if m is None:
        return None
    return int(m.group(1)), int(m.group(2)), int(m.group(3) or 0)


def cipher_settings(version: tuple[int, int, int] | None) -> dict[str, str]:
    """The packet-crypto settings for a tinc version (see the module docstring)."""
    if version is not None and version >= (1, 1, 0):
        return {}
    return {"Cipher": "aes-256-cbc", "Digest": "sha256", "MACLength": "32"}


GCM_NOTE = "not used: tinc 1.0 has no AEAD support; with it the UDP data path carries nothing"


class Tinc(Contender):
    """Two tincd daemons in router mode; each node routes the remote pod subnet into tinc."""

    name = "tinc"
    description = "tinc, router mode, userspace tun device (cipher in details)"
    packages = ("tinc",)
    binaries = ("tincd", "ip", "iperf3", "ping")
    process_names = ("tincd",)

    def __init__(self) -> None:
        self._procs: list[subprocess.Popen[Any]] = []
        self._workdir: Path | None = None
        self._version_text = ""
        self._settings: dict[str, str] = {}

    def _version(self) -> tuple[int, int, int] | None:
        if not self._version_text:
            self._version_text = tool_version(["tincd", "--version"])
        return parse_tinc_version(self._version_text)

    def available(self) -> tuple[bool, str]:
        """Needs root, tincd and /dev/net/tun."""
        ok, reason = super().available()
        if not ok:
            return ok, reason
        if not Path("/dev/net/tun").exists():
            return False, "no /dev/net/tun"
        return True, ""

    @staticmethod
    def _node_name(index: int) -> str:
        return f"n{index + 1}"

    def _write_config(self, topo: Topology, index: int, side: Side, confdir: Path) -> None:
        remote_index = 1 - index
        ifname = f"vmbtinc{index + 1}"
        netns.check_link_name(ifname)
        (confdir / "hosts").mkdir(parents=True)
        lines = [
            f"Name = {self._node_name(index)}",
            f"Interface = {ifname}",
            "Mode = router",
            "AddressFamily = ipv4",
            f"BindToAddress = {side.underlay_ip}",
            "Device = /dev/net/tun",
            "ProcessPriority = normal",
        ]
        if index == 0:
            lines.append(f"ConnectTo = {self._node_name(remote_index)}")
        (confdir / "tinc.conf").write_text("\n".join(lines) + "\n")
        host_lines = [
            f"Address = {side.underlay_ip}",
            f"Port = {TINC_PORT}",
            f"Subnet = {side.pod_subnet}",
            "Compression = 0",
            "PMTUDiscovery = no",
            *(f"{k} = {v}" for k, v in self._settings.items()),
        ]
        (confdir / "hosts" / self._node_name(index)).write_text("\n".join(host_lines) + "\n")
        remote = topo.peer(side)
        up = confdir / "tinc-up"
        up.write_text(
            "#!/bin/sh\n"
            f'ip link set dev "$INTERFACE" mtu {TUNNEL_MTU} up\n'
            f'ip route replace {remote.pod_subnet} dev "$INTERFACE"\n'
        )
        up.chmod(0o700)

    def setup(self, topo: Topology) -> None:
        """Generate keys, exchange host files, start both daemons in the foreground."""
        self._settings = cipher_settings(self._version())
        self._workdir = netns.make_tempdir("tinc")
        confdirs: list[Path] = []
        for index, side in enumerate(topo.sides):
            confdir = self._workdir / self._node_name(index)
            self._write_config(topo, index, side, confdir)
            netns.run_in(None, ["tincd", "-c", str(confdir), f"-K{RSA_BITS}"], timeout=60)
            confdirs.append(confdir)
        for index, confdir in enumerate(confdirs):
            other = confdirs[1 - index]
            name = self._node_name(1 - index)
            shutil.copy(other / "hosts" / name, confdir / "hosts" / name)
        for side, confdir in zip(topo.sides, confdirs, strict=True):
            log = confdir / "tincd.log"
            self._procs.append(
                netns.popen_in(
                    side.node_ns,
                    [
                        "tincd", "-c", str(confdir), "-D", "-d0",
                        f"--pidfile={confdir / 'tinc.pid'}", f"--logfile={log}",
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
        topo.set_pod_path_mtu(TUNNEL_MTU)

    def teardown(self, topo: Topology) -> None:
        """Stop the daemons and remove keys and configs."""
        for proc in self._procs:
            netns.stop_process(proc)
        self._procs = []
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None

    def cpu_pids(self) -> list[int]:
        """The two tincd processes we started."""
        return [p.pid for p in self._procs if p.poll() is None]

    def versions(self) -> dict[str, str]:
        """tincd's own version line."""
        self._version()
        return {"tincd": self._version_text}

    def details(self) -> dict[str, str]:
        """Mode, crypto and why aes-256-gcm is not used."""
        out = {
            "mode": "router",
            "tunnel_mtu": str(TUNNEL_MTU),
            "pmtu_discovery": "off (path MTU pinned)",
            "rsa_bits": str(RSA_BITS),
        }
        settings = self._settings or cipher_settings(self._version())
        if settings:
            out.update({k.lower(): v for k, v in settings.items()})
            out["aes-256-gcm"] = GCM_NOTE
        else:
            out["crypto"] = "SPTPS (chacha20-poly1305)"
        return out


def contenders() -> list[Contender]:
    """Registry hook."""
    return [Tinc()]

"""wireguard-go (Debian's package): userspace WireGuard, one instance per node namespace.

The UAPI control sockets live in the shared /var/run/wireguard whatever the namespace,
so the two instances need different interface names. Keys come from ``wg genkey`` and
only ever touch 0600 files in a private scratch directory.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from benchmarks import netns
from benchmarks.contenders.base import Contender
from benchmarks.iperf import tool_version
from benchmarks.topology import Topology

WG_PORT = 51820
TUNNEL_MTU = 1420
IFNAMES = ("vmbwg1", "vmbwg2")


class WireguardGo(Contender):
    """Two wireguard-go daemons in the foreground, configured with ``wg set``."""

    name = "wireguard-go"
    description = "wireguard-go userspace WireGuard (ChaCha20-Poly1305), tun device"
    packages = ("wireguard-go", "wireguard-tools")
    binaries = ("wireguard-go", "wg", "ip", "iperf3", "ping")
    process_names = ("wireguard-go",)

    def __init__(self) -> None:
        self._procs: list[subprocess.Popen[Any]] = []
        self._workdir: Path | None = None

    def available(self) -> tuple[bool, str]:
        """Needs root, the two binaries and /dev/net/tun."""
        ok, reason = super().available()
        if not ok:
            return ok, reason
        if not Path("/dev/net/tun").exists():
            return False, "no /dev/net/tun"
        return True, ""

    def _keypair(self, workdir: Path, label: str) -> tuple[Path, str]:
        """Private key file (0600) and public key; the private key is never held in argv."""
        priv = netns.run_in(None, ["wg", "genkey"]).stdout.strip()
        path = workdir / f"{label}.key"
        path.touch(mode=0o600)
        path.write_text(priv + "\n")
        pub = netns.run_in(None, ["wg", "pubkey"], input_text=priv + "\n").stdout.strip()
        return path, pub

    @staticmethod
    def _wait_socket(ifname: str, proc: subprocess.Popen[Any], timeout: float = 10.0) -> None:
        sock = netns.WIREGUARD_RUN_DIR / f"{ifname}.sock"
        deadline = time.monotonic() + timeout
        while not sock.exists():
            if proc.poll() is not None:
                raise RuntimeError(f"wireguard-go for {ifname} exited (rc={proc.returncode})")
            if time.monotonic() > deadline:
                raise RuntimeError(f"wireguard-go for {ifname}: no control socket {sock}")
            time.sleep(0.05)

    def setup(self, topo: Topology) -> None:
        """Start both daemons, set keys and peers, route the remote pod subnet into wg."""
        self._workdir = netns.make_tempdir("wg")
        keys = [self._keypair(self._workdir, f"n{i + 1}") for i in range(2)]
        for side, ifname in zip(topo.sides, IFNAMES, strict=True):
            netns.check_link_name(ifname)
            stale = netns.WIREGUARD_RUN_DIR / f"{ifname}.sock"
            stale.unlink(missing_ok=True)
            proc = netns.popen_in(
                side.node_ns,
                ["wireguard-go", "--foreground", ifname],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            self._procs.append(proc)
            self._wait_socket(ifname, proc)
        for i, (side, ifname) in enumerate(zip(topo.sides, IFNAMES, strict=True)):
            remote = topo.peer(side)
            key_path, _ = keys[i]
            _, remote_pub = keys[1 - i]
            netns.run_in(
                side.node_ns,
                [
                    "wg", "set", ifname,
                    "private-key", str(key_path),
                    "listen-port", str(WG_PORT),
                    "peer", remote_pub,
                    "allowed-ips", remote.pod_subnet,
                    "endpoint", f"{remote.underlay_ip}:{WG_PORT}",
                ],
                redact=True,
            )
            netns.configure_link(side.node_ns, ifname, mtu=TUNNEL_MTU)
        topo.route_remote_pods(devs=IFNAMES)
        topo.set_pod_path_mtu(TUNNEL_MTU)

    def teardown(self, topo: Topology) -> None:
        """Stop the daemons (they remove their sockets) and delete the key files."""
        for proc in self._procs:
            netns.stop_process(proc)
        self._procs = []
        for ifname in IFNAMES:
            (netns.WIREGUARD_RUN_DIR / f"{ifname}.sock").unlink(missing_ok=True)
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None

    def cpu_pids(self) -> list[int]:
        """The two wireguard-go processes we started (all their threads included)."""
        return [p.pid for p in self._procs if p.poll() is None]

    def versions(self) -> dict[str, str]:
        """Daemon and tool versions."""
        return {
            "wireguard-go": tool_version(["wireguard-go", "--version"]),
            "wg": tool_version(["wg", "--version"]),
        }

    def details(self) -> dict[str, str]:
        """WireGuard has exactly one cipher suite."""
        return {
            "crypto": "Noise_IK, ChaCha20-Poly1305",
            "tunnel_mtu": str(TUNNEL_MTU),
            "interfaces": ",".join(IFNAMES),
        }


def contenders() -> list[Contender]:
    """Registry hook."""
    return [WireguardGo()]

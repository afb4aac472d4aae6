"""The kernel's IPsec (XFRM), ESP tunnel mode with AES-256-GCM (rfc4106, 16-byte ICV).

Static keys, no IKE: the benchmark measures the data path only. Many kernels (this
project's CI VM among them) are built without ESP or without the GCM AEAD, so
``available`` first tries to install one SA in a scratch namespace and reports the
kernel's answer when that fails.
"""

from __future__ import annotations

import platform
import secrets

from benchmarks import netns
from benchmarks.contenders.base import Contender
from benchmarks.iperf import tool_version
from benchmarks.topology import Topology

AEAD = "rfc4106(gcm(aes))"
AEAD_KEY_BYTES = 36  # 32-byte AES-256 key + 4-byte salt
ICV_BITS = 128
TUNNEL_MTU = 1400
PROBE_NS = "vmb-xfrmprobe"


def sa_argv(src: str, dst: str, spi: int, reqid: int, key_hex: str) -> list[str]:
    """``ip xfrm state add`` for one direction (carries a key: run it redacted)."""
    return [
        "ip", "xfrm", "state", "add", "src", src, "dst", dst, "proto", "esp",
        "spi", f"0x{spi:08x}", "reqid", str(reqid), "mode", "tunnel",
        "aead", AEAD, f"0x{key_hex}", str(ICV_BITS),
    ]


def policy_argv(
    sel_src: str, sel_dst: str, direction: str, tun_src: str, tun_dst: str, reqid: int
) -> list[str]:
    """``ip xfrm policy add`` binding a pod-subnet pair to the tunnel SA."""
    return [
        "ip", "xfrm", "policy", "add", "src", sel_src, "dst", sel_dst, "dir", direction,
        "tmpl", "src", tun_src, "dst", tun_dst, "proto", "esp", "reqid", str(reqid),
        "mode", "tunnel",
    ]


def probe_esp_gcm() -> tuple[bool, str]:
    """Install a throwaway AES-GCM ESP SA in a scratch namespace; the kernel decides."""
    try:
        netns.create_namespace(PROBE_NS)
        proc = netns.run_in(
            PROBE_NS,
            sa_argv("198.51.100.1", "198.51.100.2", 0x100, 1, secrets.token_hex(AEAD_KEY_BYTES)),
            check=False,
            redact=True,
        )
    except Exception as exc:  # the probe's own failure is a reason to skip, not to crash
        return False, f"XFRM probe failed: {exc}"
    finally:
        netns.delete_namespace(PROBE_NS)
    if proc.returncode != 0:
        answer = (proc.stderr or proc.stdout).strip() or f"rc={proc.returncode}"
        return False, f"kernel refuses an ESP {AEAD} SA in XFRM: {answer}"
    return True, ""


class Xfrm(Contender):
    """ESP tunnel between the nodes' underlay addresses for the pod subnets."""

    name = "xfrm"
    description = "kernel IPsec (XFRM) ESP tunnel mode, AES-256-GCM, static keys"
    binaries = ("ip", "iperf3", "ping")

    def __init__(self) -> None:
        self._probe: tuple[bool, str] | None = None

    def available(self) -> tuple[bool, str]:
        """Root, iproute2, and a kernel that accepts the SA (probed once)."""
        ok, reason = super().available()
        if not ok:
            return ok, reason
        if self._probe is None:
            self._probe = probe_esp_gcm()
        return self._probe

    def setup(self, topo: Topology) -> None:
        """One SA per direction on both nodes, out/fwd/in policies, routes over the underlay."""
        a, b = topo.a, topo.b
        spi_ab, spi_ba = (0x1000 + secrets.randbelow(0xFFFF) for _ in range(2))
        key_ab = secrets.token_hex(AEAD_KEY_BYTES)
        key_ba = secrets.token_hex(AEAD_KEY_BYTES)
        for side in topo.sides:
            netns.run_in(side.node_ns, sa_argv(a.underlay_ip, b.underlay_ip, spi_ab, 1, key_ab),
                         redact=True)
            netns.run_in(side.node_ns, sa_argv(b.underlay_ip, a.underlay_ip, spi_ba, 2, key_ba),
                         redact=True)
        del key_ab, key_ba
        for side in topo.sides:
            remote = topo.peer(side)
            out_reqid, in_reqid = (1, 2) if side is a else (2, 1)
            netns.run_in(side.node_ns, policy_argv(
                side.pod_subnet, remote.pod_subnet, "out",
                side.underlay_ip, remote.underlay_ip, out_reqid))
            for direction in ("fwd", "in"):
                netns.run_in(side.node_ns, policy_argv(
                    remote.pod_subnet, side.pod_subnet, direction,
                    remote.underlay_ip, side.underlay_ip, in_reqid))
        topo.route_remote_pods(via_underlay=True)
        topo.set_pod_path_mtu(TUNNEL_MTU)

    def teardown(self, topo: Topology) -> None:
        """Flush SAs and policies; harmless if setup stopped half-way."""
        for side in topo.sides:
            if netns.namespace_exists(side.node_ns):
                netns.run_in(side.node_ns, ["ip", "xfrm", "state", "flush"], check=False)
                netns.run_in(side.node_ns, ["ip", "xfrm", "policy", "flush"], check=False)

    def cpu_pids(self) -> list[int]:
        """All the work is in the kernel: nothing beyond ksoftirqd, which is always counted."""
        return []

    def versions(self) -> dict[str, str]:
        """Kernel and iproute2."""
        return {"kernel": platform.release(), "iproute2": tool_version(["ip", "-V"])}

    def details(self) -> dict[str, str]:
        """Algorithm and mode."""
        return {
            "aead": f"{AEAD}, {AEAD_KEY_BYTES * 8 - 32}-bit key, {ICV_BITS}-bit ICV",
            "mode": "tunnel",
            "tunnel_mtu": str(TUNNEL_MTU),
        }


def contenders() -> list[Contender]:
    """Registry hook."""
    return [Xfrm()]

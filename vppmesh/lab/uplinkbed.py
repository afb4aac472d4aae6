"""A host with one NIC and a peer router behind it, in network namespaces, for uplink takeover.

`<prefix>h` is the host: its NIC eth0 (a veth) leads to `<prefix>p`, a peer router with
addresses behind it. VPP runs in the host namespace (the testbed profile) and can take
eth0 with `vppmesh uplink` (UplinkBed.vppmesh). Used by tests/test_uplink_vpp.py and the
VM guest's tests (tests/vm_guest_tap.py).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from vppmesh.dataplane.startup import Instance, load_profile, render
from vppmesh.host import link as linux
from vppmesh.lab.testbed import destroy, find_vpp, in_ns, sh, start_vpp

PREFIX = "vme-u"
BASE = Path("/run/vppmesh-vme-uplink")
HOST_NS = f"{PREFIX}h"
PEER_NS = f"{PREFIX}p"
HOST_ADDR = "198.51.100.10/24"  # RFC 5737 TEST-NET-2
PEER_ADDR = "198.51.100.1/24"
VPP_ADDR = "198.51.100.2/24"
BEHIND_PEER = "203.0.113.200"  # reached only through the peer, by a static route
HOST_ADDR6 = "2001:db8:1::10/64"
PEER_ADDR6 = "2001:db8:1::1/64"
BEHIND_PEER6 = "2001:db8:2::1"


class UplinkBed:
    def __init__(self) -> None:
        self.instance = Instance(name=f"{PREFIX}vpp", runtime_dir=BASE / "vpp")
        self.vpp: subprocess.Popen[bytes] | None = None

    def build(self) -> None:
        destroy(PREFIX, BASE, quiet=True)
        BASE.mkdir(parents=True)
        for ns in (HOST_NS, PEER_NS):
            sh("ip", "netns", "add", ns)
            in_ns(ns, "ip", "link", "set", "lo", "up")
        in_ns(HOST_NS, "ip", "link", "add", "eth0", "address", "02:00:5e:00:53:10", "mtu",
              "1500", "type", "veth", "peer", "name", "eth0", "netns", PEER_NS)
        in_ns(PEER_NS, "ip", "addr", "add", PEER_ADDR, "dev", "eth0")
        in_ns(PEER_NS, "ip", "addr", "add", PEER_ADDR6, "dev", "eth0", "nodad")
        in_ns(PEER_NS, "ip", "addr", "add", f"{BEHIND_PEER}/32", "dev", "lo")
        in_ns(PEER_NS, "ip", "addr", "add", f"{BEHIND_PEER6}/128", "dev", "lo")
        in_ns(PEER_NS, "ip", "link", "set", "eth0", "up")
        # The peer stands for a host across a wire, whose frames arrive complete: checksums
        # filled in, none above the MTU. A veth's would leave the checksum to be done
        # (CHECKSUM_PARTIAL), which VPP 26.06's af_packet input does not flag without the
        # vnet header, so the host got SYN-ACKs with bad checksums through VPP's bridge.
        linux.set_offloads("eth0", PEER_NS, False)
        in_ns(HOST_NS, "ip", "addr", "add", HOST_ADDR, "dev", "eth0")
        in_ns(HOST_NS, "ip", "addr", "add", HOST_ADDR6, "dev", "eth0", "nodad")
        in_ns(HOST_NS, "ip", "link", "set", "eth0", "up")
        in_ns(HOST_NS, "ip", "route", "add", f"{BEHIND_PEER}/32", "via", "198.51.100.1",
              "metric", "7")
        in_ns(HOST_NS, "ip", "-6", "route", "add", "2001:db8:2::/64", "via", "2001:db8:1::1")
        self.start_vpp()

    def start_vpp(self) -> None:
        self.vpp = start_vpp(find_vpp(), HOST_NS, self.instance, self.instance.runtime_dir,
                             render(load_profile("testbed"), self.instance))

    def kill_vpp(self) -> None:
        assert self.vpp is not None
        os.killpg(self.vpp.pid, signal.SIGKILL)
        self.vpp.wait()
        time.sleep(0.5)
        self.instance.api_socket.unlink(missing_ok=True)

    def vppmesh(self, *args: str) -> subprocess.CompletedProcess[str]:
        return in_ns(HOST_NS, sys.executable, "-m", "vppmesh", "uplink", *args,
                     "--api-socket", str(self.instance.api_socket), "--state-dir",
                     str(BASE / "state"), check=False)

"""A multi-node mesh on one machine: namespaces as hosts, one VPP per node.

Node k is the network namespace `<prefix>n<k>` running its own VPP (own runtime dir,
API, CLI and stats sockets, shared-memory prefix), whose uplink is an af_packet
interface on a veth into the underlay bridge (namespace `<prefix>ul`), or, with
`underlay="memif"`, one end of a memif link to the other node's VPP (two nodes; the
link costs VPP almost nothing, so a benchmark measures the mesh, not the wire). The
uplink holds the node's primary and extra addresses, IPv4 or IPv6 (`underlay_family`).
Pods are namespaces attached to their node's VPP like any endpoint. `vppmesh up` then
runs once per node, in the node's namespace, exactly as on a real host. Everything uses
documentation ranges and stays on this machine.

With `nat`, the last node sits behind a NAT router (namespace `<prefix>nat`, nftables):
its uplink is on an inside network and the router's outside address on the underlay is
the node's public address. `static` forwards a UDP port (14500) to the node's 4500 and
maps the node's 4500 back to it; `masquerade` only rewrites the node's outgoing packets;
`masquerade-random` does too, to a random port in NAT_RANDOM_PORTS (never the 4500 the
node's record names), as a NAT that randomises ports or shares its address does.
"""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from vppmesh.config import Mesh, MeshSettings, NatSettings, Node, dump_mesh
from vppmesh.dataplane.startup import Instance, load_profile, render
from vppmesh.dataplane.vpp import host_interfaces, interfaces, memif, routes
from vppmesh.dataplane.vpp.client import VppClient
from vppmesh.errors import VppMeshError
from vppmesh.keying.keys import generate_private_key

DEFAULT_PREFIX = "vmt-"
DEFAULT_BASE = Path("/run/vppmesh-testbed")
UNDERLAY_NET = ipaddress.IPv4Network("192.0.2.0/24")  # RFC 5737 TEST-NET-1
UNDERLAY_NET6 = ipaddress.IPv6Network("2001:db8:ee::/64")  # RFC 3849 documentation
# Behind the NAT router: its inside network (RFC 5737 TEST-NET-2) and its outside address.
NAT_INSIDE_NET = ipaddress.IPv4Network("198.51.100.0/24")
NAT_INSIDE_GATEWAY = ipaddress.IPv4Interface("198.51.100.1/24")
NAT_OUTSIDE = ipaddress.IPv4Interface("192.0.2.250/24")
NAT_STATIC_PORT = 14500
NAT_RANDOM_PORTS = (20000, 30000)  # masquerade-random: where the NAT maps each flow
POD_SUPERNET = ipaddress.IPv4Network("198.18.0.0/16")  # RFC 2544 benchmarking range
UPLINK_IFNAME = "eth0"
UNDERLAY_MTU = 1500
# A VPP under software emulation (the VM guest, docs/vm.md) starts several times slower.
VPP_START_TIMEOUT = float(os.environ.get("VPPMESH_VPP_START_TIMEOUT", "30"))
MEMIF_SOCKET_ID = 1
# ... and each vppmesh command in a node (Python and vpp-papi start-up) takes minutes.
COMMAND_TIMEOUT = float(os.environ.get("VPPMESH_TESTBED_COMMAND_TIMEOUT", "300"))


class TestbedError(VppMeshError):
    """The testbed cannot be built here (missing VPP, not root, ...)."""


class TestbedSpec(BaseModel):
    __test__ = False
    """Shape of the testbed; saved next to it so `down` and `status` need no arguments."""

    model_config = ConfigDict(extra="forbid")
    nodes: int = Field(default=3, ge=2, le=16)
    tunnels: int = Field(default=4, ge=1, le=8)
    pods: int = Field(default=1, ge=0, le=8)
    workers: int = Field(default=0, ge=0, le=4)
    profile: str = "testbed"
    prefix: str = DEFAULT_PREFIX
    base_dir: Path = DEFAULT_BASE
    mesh_table_id: int = 1717
    gso: bool = False
    underlay: Literal["veth", "memif"] = "veth"
    # Pin node k's VPP main thread to core k-1 (mod the core count), so two VPPs do not
    # share a core; its workers follow on the next cores.
    pin_cores: bool = False
    # mixed: node 1 IPv4 only, node 2 IPv4 and IPv6, the others IPv6 and IPv4 (IPv6
    # primary): pairs with node 1 use IPv4, the others IPv6.
    underlay_family: Literal["ipv4", "ipv6", "mixed"] = "ipv4"
    nat: Literal["none", "static", "masquerade", "masquerade-random"] = Field(
        default="none", description="Put the last node behind a NAT router (IPv4 only).")
    # How the host link and the pods join their node's VPP: af_packet on veths (works
    # everywhere), tap v2 (needs /dev/vhost-net: a VM guest, see docs/vm.md) or auto.
    attachment: Literal["af_packet", "tap", "auto"] = "af_packet"

    @model_validator(mode="after")
    def _memif_is_point_to_point(self) -> TestbedSpec:
        if self.underlay == "memif" and (self.nodes != 2 or self.nat != "none"):
            raise ValueError(f"underlay memif joins exactly 2 nodes (a point-to-point link), "
                             f"with no NAT, not {self.nodes}: use nodes=2 or underlay veth")
        return self

    @property
    def nat_port(self) -> int:
        """The public UDP port peers send to: a forwarded one with `static`, else 4500."""
        return NAT_STATIC_PORT if self.nat == "static" else 4500

    @property
    def host_link(self) -> str:
        """`vppmesh up --host-link` for this attachment."""
        return self.attachment


def find_vpp() -> Path:
    """The VPP binary: $VPPMESH_VPP, else `vpp` on PATH."""
    env = os.environ.get("VPPMESH_VPP")
    if env:
        path = Path(env)
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise TestbedError(f"VPPMESH_VPP={env} is not an executable file")
        return path
    found = shutil.which("vpp")
    if found is None:
        raise TestbedError(
            "no VPP found: install it from FD.io's packages (README: Quick start; "
            "apt-get install vpp vpp-plugin-core) or set VPPMESH_VPP to the path of a vpp binary")
    return Path(found)


def require_root() -> None:
    if os.geteuid() != 0:
        raise TestbedError("the testbed creates network namespaces and needs root: run it "
                           "with sudo (or as root)")


def sh(*args: str, check: bool = True, capture: bool = True,
       timeout: float | None = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), check=check, capture_output=capture, text=True,
                          timeout=timeout)


def in_ns(ns: str, *args: str, **kwargs: object) -> subprocess.CompletedProcess[str]:
    return sh("ip", "netns", "exec", ns, *args, **kwargs)  # type: ignore[arg-type]


@dataclass(frozen=True)
class NodeHandle:
    """Where everything of one testbed node lives."""

    index: int
    spec: TestbedSpec

    @property
    def name(self) -> str:
        return f"n{self.index}"

    @property
    def netns(self) -> str:
        return f"{self.spec.prefix}n{self.index}"

    @property
    def dir(self) -> Path:
        return self.spec.base_dir / self.name

    @property
    def instance(self) -> Instance:
        return Instance(name=f"{self.spec.prefix}{self.name}", runtime_dir=self.dir)

    @property
    def key_file(self) -> Path:
        return self.dir / "private.key"

    @property
    def behind_nat(self) -> bool:
        return self.spec.nat != "none" and self.index == self.spec.nodes

    @property
    def underlay(self) -> list[ipaddress.IPv4Interface | ipaddress.IPv6Interface]:
        count = max(self.spec.tunnels, 1)
        base6 = int(UNDERLAY_NET6.network_address) + self.index * 16
        v6 = [ipaddress.IPv6Interface(f"{ipaddress.IPv6Address(base6 + t + 1)}/64")
              for t in range(count)]
        net = NAT_INSIDE_NET if self.behind_nat else UNDERLAY_NET
        base = int(net.network_address) + self.index * 10
        v4 = [ipaddress.IPv4Interface(f"{ipaddress.IPv4Address(base + t + 1)}/24")
              for t in range(count)]
        family = self.spec.underlay_family
        if family == "mixed":
            return v4 if self.index == 1 else [*v4, *v6] if self.index == 2 else [*v6, *v4]
        return v6 if family == "ipv6" else v4  # type: ignore[return-value]

    @property
    def nat(self) -> NatSettings | None:
        if not self.behind_nat:
            return None
        return NatSettings(public=NAT_OUTSIDE.ip, port=self.spec.nat_port)

    @property
    def pod_cidr(self) -> ipaddress.IPv4Network:
        return ipaddress.IPv4Network(f"198.18.{self.index}.0/24")

    def pod_netns(self, pod: int) -> str:
        return f"{self.spec.prefix}n{self.index}p{pod}"

    def pod_address(self, pod: int) -> ipaddress.IPv4Address:
        return self.pod_cidr.network_address + 10 + pod

    def pod_name(self, pod: int) -> str:
        return f"n{self.index}p{pod}"


class Testbed:
    __test__ = False
    def __init__(self, spec: TestbedSpec) -> None:
        if spec.nat != "none" and spec.underlay_family != "ipv4":
            raise TestbedError("the testbed's NAT router is IPv4 only: use "
                               "--underlay-family ipv4 with --nat")
        self.spec = spec
        self.nodes = [NodeHandle(i + 1, spec) for i in range(spec.nodes)]

    @property
    def underlay_ns(self) -> str:
        return f"{self.spec.prefix}ul"

    @property
    def nat_ns(self) -> str:
        """The NAT router's namespace (with `nat`): `out0` on the underlay, `in0` inside."""
        return f"{self.spec.prefix}nat"

    @property
    def mesh_file(self) -> Path:
        return self.spec.base_dir / "mesh.yaml"

    @property
    def spec_file(self) -> Path:
        return self.spec.base_dir / "testbed.json"

    @classmethod
    def load(cls, base_dir: Path = DEFAULT_BASE) -> Testbed:
        path = base_dir / "testbed.json"
        if not path.exists():
            raise TestbedError(f"no testbed at {base_dir} (run `vppmesh testbed up` first)")
        return cls(TestbedSpec.model_validate_json(path.read_text()))

    # ---- building -------------------------------------------------------------------
    def __enter__(self) -> Testbed:
        """`with Testbed(spec) as bed:` builds it and always tears it down after."""
        self.up()
        return self

    def __exit__(self, *exc: object) -> None:
        self.down(quiet=True)

    def up(self, *, progress: object = None, join: bool = True) -> None:
        """Build everything and bring every node into the mesh; cleans up on failure.

        With join=False the nodes get their VPP and uplink but no `vppmesh up` and no
        pods: a caller that joins them another way (a datastore) does that itself.
        """
        require_root()
        vpp = find_vpp()
        say = progress if callable(progress) else (lambda _msg: None)
        self.down(quiet=True)
        try:
            self.spec.base_dir.mkdir(parents=True, exist_ok=True)
            self.spec_file.write_text(self.spec.model_dump_json(indent=2))
            say("underlay")
            self._underlay()
            say("keys and mesh file")
            self._mesh()
            for node in self.nodes:
                say(f"VPP on {node.name}")
                self._start_vpp(node, vpp)
            for node in self.nodes:
                self._uplink(node)
            if not join:
                return
            for node in self.nodes:
                say(f"vppmesh up on {node.name}")
                self.run_vppmesh(node, "up", *self.up_args(node))
            for node in self.nodes:
                for pod in range(self.spec.pods):
                    say(f"pod {node.pod_name(pod)}")
                    self.add_pod(node, pod)
        except BaseException:
            self.down(quiet=True)
            raise

    @property
    def memif_socket(self) -> Path:
        return self.spec.base_dir / "memif.sock"

    def _underlay(self) -> None:
        if self.spec.underlay == "memif":
            for node in self.nodes:
                sh("ip", "netns", "add", node.netns)
                in_ns(node.netns, "ip", "link", "set", "lo", "up")
            return
        ns = self.underlay_ns
        sh("ip", "netns", "add", ns)
        in_ns(ns, "ip", "link", "set", "lo", "up")
        for scope in ("all", "default"):  # a plain switch: no IPv6 of its own on the wire
            in_ns(ns, "sysctl", "-qw", f"net.ipv6.conf.{scope}.disable_ipv6=1")
        in_ns(ns, "ip", "link", "add", "br0", "type", "bridge")
        in_ns(ns, "ip", "link", "set", "br0", "up")
        # Nothing answers MLD here: without snooping, IPv6 neighbor discovery floods.
        in_ns(ns, "ip", "link", "set", "br0", "type", "bridge", "mcast_snooping", "0")
        if self.spec.nat != "none":
            self._nat_router()
        for node in self.nodes:
            sh("ip", "netns", "add", node.netns)
            in_ns(node.netns, "ip", "link", "set", "lo", "up")
            # A host routes, as every Kubernetes node does (a new namespace inherits the
            # machine's IPv4 setting, so it would otherwise vary with the machine).
            for sysctl in ("net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"):
                in_ns(node.netns, "sysctl", "-qw", sysctl)
            if node.behind_nat:
                side, port = self.nat_ns, "in0"
            else:
                side, port = ns, f"ul-{node.name}"
            in_ns(side, "ip", "link", "add", port, "mtu", str(UNDERLAY_MTU), "type", "veth",
                  "peer", "name", UPLINK_IFNAME, "netns", node.netns)
            if node.behind_nat:
                in_ns(side, "ip", "address", "add", str(NAT_INSIDE_GATEWAY), "dev", port)
                in_ns(side, "ip", "link", "set", port, "up")
            else:
                in_ns(side, "ip", "link", "set", port, "master", "br0", "up")
            # VPP owns the uplink's addresses: Linux keeps none, IPv6 link-local included.
            in_ns(node.netns, "sysctl", "-qw",
                  f"net.ipv6.conf.{UPLINK_IFNAME}.disable_ipv6=1")
            in_ns(node.netns, "ip", "link", "set", UPLINK_IFNAME, "mtu", str(UNDERLAY_MTU), "up")

    def _nat_router(self) -> None:
        """A Linux NAT between the inside network and the underlay (nftables)."""
        nat, inside = self.nat_ns, self.nodes[-1]
        sh("ip", "netns", "add", nat)
        in_ns(nat, "ip", "link", "set", "lo", "up")
        for scope in ("all", "default"):  # an IPv4 router: nothing else on either side
            in_ns(nat, "sysctl", "-qw", f"net.ipv6.conf.{scope}.disable_ipv6=1")
        in_ns(self.underlay_ns, "ip", "link", "add", "ul-nat", "mtu", str(UNDERLAY_MTU),
              "type", "veth", "peer", "name", "out0", "netns", nat)
        in_ns(self.underlay_ns, "ip", "link", "set", "ul-nat", "master", "br0", "up")
        in_ns(nat, "ip", "address", "add", str(NAT_OUTSIDE), "dev", "out0")
        in_ns(nat, "ip", "link", "set", "out0", "up")
        in_ns(nat, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        (self.spec.base_dir / "nat.nft").write_text(
            nat_ruleset(self.spec.nat, inside.underlay[0].ip, self.spec.nat_port))
        in_ns(nat, "nft", "-f", str(self.spec.base_dir / "nat.nft"))

    def _mesh(self) -> None:
        nodes = []
        for node in self.nodes:
            node.dir.mkdir(parents=True, exist_ok=True)
            public = generate_private_key(node.key_file, force=True)
            nodes.append(Node(name=node.name, node_number=node.index,
                              underlay=node.underlay,  # type: ignore[arg-type]
                              pod_cidr=node.pod_cidr, public_key=public, nat=node.nat))
        mesh = Mesh(settings=MeshSettings(tunnels_per_peer=self.spec.tunnels,
                                          underlay_mtu=UNDERLAY_MTU,
                                          mesh_table_id=self.spec.mesh_table_id,
                                          gso=self.spec.gso),
                    nodes=nodes)
        self.mesh_file.write_text(dump_mesh(mesh))

    def _start_vpp(self, node: NodeHandle, vpp: Path) -> None:
        profile = load_profile(self.spec.profile)
        if self.spec.pin_cores:
            core = (node.index - 1) % (os.cpu_count() or 1)
            profile = profile.model_copy(update={"main_core": core})
        proc = start_vpp(vpp, node.netns, node.instance, node.dir,
                         render(profile, node.instance, workers=self.spec.workers))
        (node.dir / "launcher.pid").write_text(str(proc.pid))

    def _uplink(self, node: NodeHandle) -> None:
        """Give VPP the node's uplink (af_packet on the veth, or the memif), MTU, address."""
        with VppClient(node.instance.api_socket).connect() as api:
            if self.spec.underlay == "memif":
                # Node 2 listens on the socket, node 1 connects; the link comes up by
                # itself. Both ends copy frames (no zero copy), so each VPP works on
                # packets in its own buffers, as behind a NIC.
                api.call(memif.add_socket(MEMIF_SOCKET_ID, self.memif_socket))
                index = api.call(memif.create(MEMIF_SOCKET_ID, 0, node.index == 2,
                                              _uplink_mac(node.index))).sw_if_index
            else:
                index = api.call(host_interfaces.create_af_packet(
                    UPLINK_IFNAME, _uplink_mac(node.index))).sw_if_index
            api.call_many([
                interfaces.set_mtu(index, UNDERLAY_MTU, "uplink"),
                interfaces.address(index, node.underlay[0], True),
                interfaces.set_admin(index, True, "uplink"),
            ])
            if node.behind_nat:  # the underlay is beyond the NAT router
                api.call(routes.route(0, UNDERLAY_NET, [index], True,
                                      nexthop=NAT_INSIDE_GATEWAY.ip))

    def kill_vpp(self, node: NodeHandle, sig: int = signal.SIGKILL) -> None:
        """Signal the node's VPP and wait until it is gone (reaped when it is this
        process's child), so that restart_vpp does not wait on a zombie."""
        pid = _vpp_pid(node)
        if pid is None:
            return
        os.kill(pid, sig)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:  # not ours: wait for it to go
                done = 0 if Path(f"/proc/{pid}").exists() else pid
            if done:
                return
            time.sleep(0.05)

    def restart_vpp(self, node: NodeHandle) -> None:
        """Kill the node's VPP and start a fresh one with its uplink, as after a crash."""
        pid = _vpp_pid(node)
        if pid is not None:
            os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + 10
            while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
                time.sleep(0.05)
        node.instance.api_socket.unlink(missing_ok=True)
        self._start_vpp(node, find_vpp())
        self._uplink(node)

    # ---- pods -----------------------------------------------------------------------
    def add_pod(self, node: NodeHandle, pod: int) -> None:
        ns = node.pod_netns(pod)
        sh("ip", "netns", "add", ns)
        in_ns(ns, "ip", "link", "set", "lo", "up")
        self.run_vppmesh(node, "attach", *self.attach_args(node, pod))

    def attach_args(self, node: NodeHandle, pod: int) -> list[str]:
        """`vppmesh attach` arguments of one pod (also for re-attaching it)."""
        return ["--name", node.pod_name(pod), "--netns", node.pod_netns(pod),
                "--address", str(node.pod_address(pod)), "--index", str(pod),
                "--attachment", self.spec.attachment]

    # ---- running things -------------------------------------------------------------
    def vppmesh_args(self, node: NodeHandle) -> list[str]:
        return ["--mesh", str(self.mesh_file), "--node", node.name, "--api-socket",
                str(node.instance.api_socket)]

    def state_args(self, node: NodeHandle) -> list[str]:
        """What `up` needs besides the common arguments: the key and the key ledger."""
        return ["--key", str(node.key_file), "--state-dir", str(node.dir)]

    def up_args(self, node: NodeHandle) -> list[str]:
        """Everything `vppmesh up` needs beyond the common arguments."""
        return [*self.state_args(node), "--host-link", self.spec.host_link]

    def run_vppmesh(self, node: NodeHandle, command: str, *extra: str,
                    check: bool = True) -> subprocess.CompletedProcess[str]:
        args = [sys.executable, "-m", "vppmesh", command, *self.vppmesh_args(node), *extra]
        result = in_ns(node.netns, *args, check=False, timeout=COMMAND_TIMEOUT)
        if check and result.returncode != 0:
            raise TestbedError(f"`vppmesh {command}` failed on {node.name}:\n"
                               f"{result.stdout}{result.stderr}")
        return result

    # ---- tearing down ---------------------------------------------------------------
    def down(self, *, quiet: bool = False) -> list[str]:
        """Remove every namespace, link and VPP of this testbed prefix, whatever state."""
        return destroy(self.spec.prefix, self.spec.base_dir, quiet=quiet)

    def status(self) -> dict[str, object]:
        nodes = []
        for node in self.nodes:
            running = node.instance.api_socket.exists() and _vpp_pid(node) is not None
            nodes.append({"node": node.name, "netns": node.netns, "vpp_running": running,
                          "underlay": [str(a) for a in node.underlay],
                          "pod_cidr": str(node.pod_cidr),
                          "pods": [node.pod_netns(p) for p in range(self.spec.pods)],
                          "api_socket": str(node.instance.api_socket)})
        return {"mesh_file": str(self.mesh_file), "nodes": nodes}


def nat_ruleset(mode: str, inside: object, public_port: int) -> str:
    """nftables rules of the NAT router: masquerade out; with `static`, a port forward.

    `static` pins the node's UDP 4500 to the public port both ways (a DNAT in, to its
    first address; an SNAT out, from any of its addresses: one flow per peer address, so
    they never clash), as a port forward on a home or branch router does; `masquerade`
    lets the kernel
    pick the outside port (4500 while it is free) and accepts from outside only what
    answers a flow the node started; `masquerade-random` picks it at random from
    NAT_RANDOM_PORTS for each flow.
    """
    forward = ""
    snat = ""
    low, high = NAT_RANDOM_PORTS
    if mode == "masquerade-random":  # UDP only: a port range needs a transport match
        snat = (f'    oifname "out0" meta l4proto udp masquerade to :{low}-{high} '
                "random\n")
    if mode == "static":
        forward = (f'    iifname "out0" udp dport {public_port} '
                   f"dnat to {inside}:4500\n")
        snat = (f'    oifname "out0" ip saddr {NAT_INSIDE_NET} udp sport 4500 '
                f"snat to {NAT_OUTSIDE.ip}:{public_port}\n")
    return (
        "table ip vppmesh_nat {\n"
        "  chain prerouting {\n    type nat hook prerouting priority dstnat; policy accept;\n"
        f"{forward}  }}\n"
        "  chain postrouting {\n    type nat hook postrouting priority srcnat; "
        "policy accept;\n"
        f'{snat}    oifname "out0" masquerade\n  }}\n'
        "  chain forward {\n    type filter hook forward priority filter; policy drop;\n"
        "    ct state established,related accept\n"
        '    iifname "in0" oifname "out0" accept\n'
        '    iifname "out0" ct status dnat accept\n  }\n'
        "}\n")


def start_vpp(vpp: Path, netns: str, instance: Instance, workdir: Path,
              startup_conf: str) -> subprocess.Popen[bytes]:
    """Start one VPP in a namespace and wait until its API answers (the benchmarks too)."""
    workdir.mkdir(parents=True, exist_ok=True)
    conf = workdir / "startup.conf"
    conf.write_text(startup_conf)
    log_path = workdir / "vpp.stdout"
    with log_path.open("w") as log:
        proc = subprocess.Popen(["ip", "netns", "exec", netns, str(vpp), "-c", str(conf)],
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + VPP_START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise TestbedError(f"VPP in {netns} exited at start: "
                               f"{log_path.read_text()[-2000:]}")
        if instance.api_socket.exists():
            try:
                VppClient(instance.api_socket, timeout=2).connect().close()
                return proc
            except VppMeshError:
                pass
        time.sleep(0.2)
    proc.kill()
    raise TestbedError(f"VPP in {netns} did not open {instance.api_socket} "
                       f"within {VPP_START_TIMEOUT:.0f} s")


@contextmanager
def single_vpp(netns: str, run_dir: Path, *, profile: str = "testbed",
               main_heap_size: str | None = None, workers: int = 0,
               main_core: int | None = None,
               statseg_size: str | None = None) -> Iterator[Instance]:
    """One VPP (no uplink, no peers) in its own namespace, for control-plane work and
    the encrypt-only capacity runs (`workers`, main thread pinned to `main_core`).

    Everything is removed afterwards (also on error); `netns` doubles as the prefix that
    `destroy()` sweeps, so leftovers of a crashed run go too.
    """
    require_root()
    vpp = find_vpp()
    destroy(netns, run_dir, quiet=True)
    instance = Instance(name=netns, runtime_dir=run_dir)
    loaded = load_profile(profile)
    if main_heap_size is not None:
        loaded = loaded.model_copy(update={"main_heap_size": main_heap_size})
    if main_core is not None:
        loaded = loaded.model_copy(update={"main_core": main_core})
    if statseg_size is not None:
        loaded = loaded.model_copy(update={"statseg_size": statseg_size})
    try:
        sh("ip", "netns", "add", netns)
        in_ns(netns, "ip", "link", "set", "lo", "up")
        start_vpp(vpp, netns, instance, run_dir, render(loaded, instance, workers=workers))
        yield instance
    finally:
        destroy(netns, run_dir, quiet=True)


def _uplink_mac(index: int) -> str:
    return f"02:fe:ee:00:00:{index:02x}"


def _vpp_pid(node: NodeHandle) -> int | None:
    try:
        pid = int(node.instance.pid_file.read_text().strip())
        os.kill(pid, 0)
        return pid
    except (OSError, ValueError):
        return None


def _namespaces(prefix: str) -> list[str]:
    result = sh("ip", "-json", "netns", "list", check=False)
    try:
        entries = json.loads(result.stdout or "[]")
    except json.JSONDecodeError:
        entries = []
    return [e["name"] for e in entries if e.get("name", "").startswith(prefix)]


def _pids_in_netns(ns: str) -> list[int]:
    result = sh("ip", "netns", "pids", ns, check=False)
    return [int(p) for p in result.stdout.split() if p.isdigit()]


def destroy(prefix: str, base_dir: Path, *, quiet: bool = False) -> list[str]:
    """Kill every process in the prefix's namespaces, then delete the namespaces."""
    removed: list[str] = []
    namespaces = _namespaces(prefix)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = [p for ns in namespaces for p in _pids_in_netns(ns)]
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                continue
            if sig == signal.SIGTERM:
                removed.append(f"process {pid}")
        deadline = time.monotonic() + 5
        while pids and time.monotonic() < deadline:
            pids = [p for p in pids if Path(f"/proc/{p}").exists()]
            time.sleep(0.1)
        if not pids:
            break
    for ns in namespaces:
        sh("ip", "netns", "del", ns, check=False)
        removed.append(f"netns {ns}")
    for shm in Path("/dev/shm").glob(f"{prefix}*"):
        shm.unlink(missing_ok=True)
    if base_dir.exists():
        shutil.rmtree(base_dir, ignore_errors=True)
        removed.append(f"dir {base_dir}")
    if not quiet:
        for line in removed:
            print(f"removed {line}", file=sys.stderr)
    return removed

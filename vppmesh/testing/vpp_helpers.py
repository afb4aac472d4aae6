"""What the real-VPP tests share: their testbeds, agents, CNI runs, pod traffic and captures.

Imported as `from vppmesh.testing import vpp_helpers`. Each test file keeps its own
namespace prefix and base directory and passes them in. It uses benchmarks/ (the CNI
plugin command, stopping processes): it runs from a checkout, as the real-VPP tests do.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml

from benchmarks.cni_latency import CNI_PATH, plugin_command
from benchmarks.netns import stop_process
from vppmesh.channel.endpoint import PORT as CHANNEL_PORT
from vppmesh.dataplane.vpp.client import Request, VppClient
from vppmesh.keying.epochs import GenerationStore, PeerGenerations
from vppmesh.keying.pairs import pair_secrecy
from vppmesh.lab.testbed import NodeHandle, Testbed, TestbedSpec, in_ns, sh
from vppmesh.testing.etcd_server import EtcdServer, running_etcd


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


def require_bpffs() -> None:
    """af_xdp: libxdp wants a BPF filesystem (it falls back to a single program in a
    namespace whose /sys hides it, but the mount must exist)."""
    if not Path("/sys/fs/bpf").is_dir():
        pytest.skip("no /sys/fs/bpf: af_xdp needs a BPF filesystem")
    mounted = subprocess.run(["mount", "-t", "bpf"], capture_output=True, text=True).stdout
    if "/sys/fs/bpf" not in mounted:
        subprocess.run(["mount", "-t", "bpf", "bpf", "/sys/fs/bpf"], check=True)


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


ETCD_ADDRESS = "203.0.113.1"  # RFC 5737 TEST-NET-3: the management network
ERROR_LINE = re.compile(r"^\s*(\d+)\s+(\S+)\s+(.+?)\s+(error|info|warn\w*|unknown)\s*$")


def errors(api: VppClient) -> Counter[tuple[str, str]]:
    """`show errors` as {(node, reason): count}."""
    counts: Counter[tuple[str, str]] = Counter()
    for line in api.cli("show errors").splitlines():
        m = ERROR_LINE.match(line)
        if m:
            counts[(m.group(2), m.group(3).strip())] += int(m.group(1))
    return counts


def rx_modes(api: VppClient, ifname: str) -> list[str]:
    """The receive mode of each queue of an interface (`show interface rx-placement`)."""
    return [line.rsplit("(", 1)[1].rstrip(")")
            for line in api.cli("show interface rx-placement").splitlines()
            if line.split()[:1] == [ifname]]


# ---- testbeds ---------------------------------------------------------------------------
@contextmanager
def testbed(*requirements: Callable[[], object], join: bool = True,
            **spec: Any) -> Iterator[Testbed]:
    """A testbed of TestbedSpec(**spec), always torn down after.

    Skipped first when there is no VPP or no root, then by each of `requirements` in turn
    (each calls pytest.skip when what it needs is missing). With join=False the nodes get
    their VPP and uplink but do not join a mesh (Testbed.up)."""
    require_vpp()
    for requirement in requirements:
        requirement()
    bed = Testbed(TestbedSpec(**spec))
    bed.up(join=join)
    try:
        yield bed
    finally:
        bed.down(quiet=True)


def bed_fixture(*requirements: Callable[[], object], **spec: Any) -> Any:
    """A module-scoped fixture `bed`: testbed(*requirements, **spec), shared by the module's
    tests. A test module defines it with `bed = vpp_helpers.bed_fixture(...)`."""

    @pytest.fixture(scope="module", name="bed")
    def bed() -> Iterator[Testbed]:
        with testbed(*requirements, **spec) as built:
            yield built

    return bed


def add_namespaces(*names: str) -> None:
    """Empty network namespaces (the pods a CNI plugin fills), loopback up."""
    for ns in names:
        sh("ip", "netns", "add", ns)
        in_ns(ns, "ip", "link", "set", "lo", "up")


def on_demand_rekeys(bed: Testbed, grace: float) -> None:
    """Rekeys on demand only (the schedule is unit-tested); receivers follow a new
    generation after `grace` seconds."""
    data = yaml.safe_load(bed.mesh_file.read_text())
    data["settings"].update(rekey_grace=grace, rekey_interval=0)
    bed.mesh_file.write_text(yaml.safe_dump(data, sort_keys=False))


def settled_on_agreed_keys(nodes: list[NodeHandle]) -> bool:
    """Every pair of `nodes` sends on agreed keys both ways, and every receiver has slid
    to what its peer sends on (nothing left to change)."""
    states = {n.name: GenerationStore(n.dir, n.name).load() for n in nodes}
    for node in nodes:
        for peer in nodes:
            if peer is node:
                continue
            ours, theirs = states[node.name].peers.get(peer.name), \
                states[peer.name].peers.get(node.name)
            if ours is None or theirs is None or ours.out not in ours.ephemeral_out or \
                    theirs.in_base != ours.out or theirs.in_base not in theirs.ephemeral_in:
                return False
    return True


def peer_state(node: NodeHandle, peer: NodeHandle) -> PeerGenerations:
    return GenerationStore(node.dir, node.name).load().peers[peer.name]


def sending(node: NodeHandle, peer: NodeHandle) -> int:
    """The generation `node` sends on towards `peer`."""
    return peer_state(node, peer).out


def owned(node: NodeHandle, peer_number: int | None = None) -> set[tuple[str, int]]:
    """vppmesh's tunnels (by sw_if_index) and SAs (by id) in the node's VPP: towards one
    peer, or all of them."""
    from vppmesh.dataplane.state import is_owned_sa_id, is_owned_tunnel_instance
    from vppmesh.dataplane.vpp import ipip, ipsec

    with VppClient(node.instance.api_socket).connect() as api:
        tunnels = {("tunnel", t.sw_if_index) for t in ipip.dump_tunnels(api)
                   if is_owned_tunnel_instance(t.instance)
                   and (peer_number is None or (t.instance // 100) % 100_000 == peer_number)}
        sas = {("sa", s.spec.sa_id) for s in ipsec.dump_sas(api)
               if is_owned_sa_id(s.spec.sa_id)
               and (peer_number is None or s.spec.peer_number == peer_number)}
    return tunnels | sas


def all_forward_secret(bed: Testbed) -> bool:
    for node in bed.nodes:
        peers = [p.name for p in bed.nodes if p is not node]
        found = pair_secrecy(GenerationStore(node.dir, node.name).load(), peers)
        if len(found) != len(peers) or not all(f.forward_secret for f in found.values()):
            return False
    return True


def plan_changes(stdout: str) -> int:
    """The change count `vppmesh plan` printed."""
    found = re.search(r"^(\d+) change\(s\)$", stdout, re.M)
    assert found, f"no change count in: {stdout!r}"
    return int(found.group(1))


def nat_keepalives(node: NodeHandle) -> int:
    """RFC 3948 keepalives the node's VPP dropped (a NATed peer's, through its NAT)."""
    with VppClient(node.instance.api_socket).connect() as api:
        counts = errors(api)
    return sum(n for (_, reason), n in counts.items() if reason == "NAT Keepalive")


def vppctl(node: NodeHandle, *command: str) -> str:
    """A CLI command on the node's VPP (the vppctl beside the VPP binary, else PATH's)."""
    binary = Path(vpp_binary() or "vpp").with_name("vppctl")
    found = str(binary) if binary.exists() else shutil.which("vppctl")
    if found is None:
        pytest.skip(f"no vppctl next to the VPP binary ({binary}) nor on PATH")
    return subprocess.run([found, "-s", str(node.instance.cli_socket), *command],
                          capture_output=True, text=True, check=True, timeout=30).stdout


# ---- agents -----------------------------------------------------------------------------
class WatchAgent:
    """`vppmesh up --watch` for one node (with `extra` options), in the node's namespace,
    appending to its agent.log; stopped with SIGTERM, killed after `grace` seconds."""

    def __init__(self, bed: Testbed, node: NodeHandle, *extra: str,
                 grace: float = 3.0) -> None:
        self.bed, self.node = bed, node
        self.extra, self.grace = extra, grace
        self.log = node.dir / "agent.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        args = ["ip", "netns", "exec", self.node.netns, sys.executable, "-m", "vppmesh", "up",
                "--watch", *self.bed.vppmesh_args(self.node), *self.bed.state_args(self.node),
                *self.extra]
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)

    def stop(self) -> None:
        stop_process(self.proc, grace=self.grace)
        self.proc = None

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


class OwnMeshAgent(WatchAgent):
    """`up --watch` reading the node's own copy of the mesh file (`<node dir>/mesh.yaml`):
    a rotation's steps reach the nodes one at a time, as files copied to real hosts do."""

    def start(self) -> None:
        args = ["ip", "netns", "exec", self.node.netns, sys.executable, "-m", "vppmesh", "up",
                "--watch", *own_args(self.node), "--node", self.node.name, "--api-socket",
                str(self.node.instance.api_socket), "--key", str(self.node.key_file),
                *self.extra]
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)


def own_args(node: NodeHandle, *, key: bool = False) -> list[str]:
    """The node's own mesh file (after the testbed's arguments: the last --mesh wins), its
    state (and key)."""
    return ["--mesh", str(node.dir / "mesh.yaml"), "--state-dir", str(node.dir),
            *(["--key", str(node.key_file)] if key else [])]


def rekey_agreed(bed: Testbed, node: NodeHandle) -> float:
    """`vppmesh rekey` on the node (its own mesh file); seconds until every pair of it
    sends on a newer key."""
    from vppmesh.testing.wait import wait_for

    others = [n for n in bed.nodes if n is not node]
    before = {p.name: sending(node, p) for p in others}
    started = time.monotonic()
    out = bed.run_vppmesh(node, "rekey", *own_args(node, key=True), check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    wait_for(lambda: all(sending(node, p) > before[p.name] for p in others), 30,
             f"rekey of {node.name} agreed with {[p.name for p in others]}", interval=0.2)
    return time.monotonic() - started


def status_line(bed: Testbed, node: NodeHandle, label: str) -> str:
    """The line of the node's `vppmesh status` that starts with `label:` ("" if none)."""
    out = bed.run_vppmesh(node, "status", *own_args(node), check=False).stdout
    found = re.search(rf"^.*{re.escape(label)}: .*$", out, re.M)
    return found.group(0) if found else ""


Agents = TypeVar("Agents", bound=dict[str, WatchAgent])


@contextmanager
def running_agents(agents: Agents) -> Iterator[Agents]:
    """Start every agent; stop them all after."""
    for agent in agents.values():
        agent.start()
    try:
        yield agents
    finally:
        for agent in agents.values():
            agent.stop()


# ---- datastore --------------------------------------------------------------------------
def management_network(bed: Testbed, etcd_ns: str) -> None:
    """A bridge in the etcd namespace, a veth `mgmt0` from every node namespace into it."""
    sh("ip", "netns", "add", etcd_ns)
    in_ns(etcd_ns, "ip", "link", "set", "lo", "up")
    in_ns(etcd_ns, "ip", "link", "add", "br0", "type", "bridge")
    in_ns(etcd_ns, "ip", "addr", "add", f"{ETCD_ADDRESS}/24", "dev", "br0")
    in_ns(etcd_ns, "ip", "link", "set", "br0", "up")
    for node in bed.nodes:
        port = f"mg-{node.name}"
        in_ns(etcd_ns, "ip", "link", "add", port, "type", "veth", "peer", "name", "mgmt0",
              "netns", node.netns)
        in_ns(etcd_ns, "ip", "link", "set", port, "master", "br0", "up")
        in_ns(node.netns, "ip", "addr", "add", f"203.0.113.{10 + node.index}/24", "dev",
              "mgmt0")
        in_ns(node.netns, "ip", "link", "set", "mgmt0", "up")


@contextmanager
def management_etcd(bed: Testbed, etcd_ns: str) -> Iterator[EtcdServer]:
    """etcd in its own namespace at ETCD_ADDRESS, on a management network every node
    namespace reaches (the way hosts reach their datastore over the host network); its data
    in the testbed's base directory."""
    management_network(bed, etcd_ns)
    data_dir = bed.spec.base_dir / "etcd"
    data_dir.mkdir()
    with running_etcd(ETCD_ADDRESS, wrap=["ip", "netns", "exec", etcd_ns],
                      data_dir=data_dir) as etcd:
        yield etcd


def etcd_url(etcd: EtcdServer) -> str:
    return f"etcd://{ETCD_ADDRESS}:{etcd.port}/vppmesh"


def start_datastore_agent(bed: Testbed, node: NodeHandle, url: str,
                          *extra: str) -> subprocess.Popen[bytes]:
    """`vppmesh up --watch --datastore url` for one node (its own record from the testbed,
    settings from the mesh file), in the node's namespace, writing its agent.log."""
    log = open(node.dir / "agent.log", "w")  # noqa: SIM115 - handed to the child
    args = [sys.executable, "-m", "vppmesh", "up", "--watch", "--datastore", url,
            *bed.vppmesh_args(node), *bed.state_args(node), "--pod-cidr", str(node.pod_cidr),
            "--settings", str(bed.mesh_file), *extra]
    args += [a for address in node.underlay for a in ("--underlay", str(address))]
    return subprocess.Popen(["ip", "netns", "exec", node.netns, *args], stdout=log,
                            stderr=subprocess.STDOUT)


# ---- CNI --------------------------------------------------------------------------------
def require_host_local() -> None:
    if not (CNI_PATH / "host-local").exists():
        pytest.skip(f"no host-local IPAM plugin in {CNI_PATH}: apt-get install "
                    "containernetworking-plugins")


def run_cni(host_ns: str, command: str, conf: dict[str, Any] | str, *, container: str,
            netns: str | None, pod: str | None) -> subprocess.CompletedProcess[str]:
    """The plugin in a node's namespace (`host_ns`), as its container runtime runs it:
    CNI_* variables, the network configuration on stdin. No CNI_NETNS without `netns`, no
    CNI_ARGS without `pod` (the pod's name)."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "CNI_COMMAND": command,
           "CNI_CONTAINERID": container, "CNI_IFNAME": "eth0", "CNI_PATH": str(CNI_PATH)}
    if netns is not None:
        env["CNI_NETNS"] = f"/var/run/netns/{netns}"
    if pod is not None:
        # As the kubelet sets it: IgnoreUnknown lets host-local accept the K8S_ keys.
        env["CNI_ARGS"] = f"IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME={pod}"
    stdin = conf if isinstance(conf, str) else json.dumps(conf)
    return subprocess.run(["ip", "netns", "exec", host_ns, *plugin_command()], input=stdin,
                          env=env, capture_output=True, text=True, timeout=120)


# ---- traffic ----------------------------------------------------------------------------
def ping_ok(src_ns: str, dst: str) -> bool:
    return in_ns(src_ns, "ping", "-c", "1", "-W", "1", dst, check=False).returncode == 0


def pod_ping(src: NodeHandle, dst: NodeHandle, *, count: int,
             size: int | None = None) -> subprocess.CompletedProcess[str]:
    """`ping -c count -W 2` from src's first pod to dst's first pod; with `size`, that
    payload with DF set (`-M do -s size`)."""
    df = ["-M", "do", "-s", str(size)] if size is not None else []
    return in_ns(src.pod_netns(0), "ping", *df, "-c", str(count), "-W", "2",
                 str(dst.pod_address(0)), check=False)


def every_pair(bed: Testbed) -> list[tuple[NodeHandle, NodeHandle]]:
    """Every (src, dst) pair of distinct nodes, src by src."""
    return [(src, dst) for src in bed.nodes for dst in bed.nodes if src is not dst]


def assert_pods_ping(pairs: Iterable[tuple[NodeHandle, NodeHandle]], *, count: int) -> None:
    for src, dst in pairs:
        ping = pod_ping(src, dst, count=count)
        assert ping.returncode == 0, f"{src.name} -> {dst.name}: {ping.stdout}"


class SteadyPing:
    """`ping -i interval` from a namespace for as long as a `with` block runs, stopped
    with SIGINT so that it prints its summary (`summary` after the block). Traffic that a
    check needs (a packet to replay, an SA that moves) then flows however long the check
    takes to start, instead of for a count or a deadline guessed in advance."""

    def __init__(self, ns: str, target: str, interval: float = 0.2) -> None:
        self.args = ["ip", "netns", "exec", ns, "ping", "-i", f"{interval:g}", target]
        self.output = ""
        self.summary = ""

    def __enter__(self) -> SteadyPing:
        self.proc = subprocess.Popen(self.args, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        return self

    def __exit__(self, *exc: object) -> None:
        self.proc.send_signal(signal.SIGINT)  # `ip netns exec` execs ping: same process
        try:
            self.output, _ = self.proc.communicate(timeout=30)
        finally:
            stop_process(self.proc)
        self.summary = "\n".join(line for line in self.output.splitlines()
                                 if "icmp_seq=" not in line)

    def loss_percent(self) -> float:
        """The requests left unanswered, in percent of those whose fate was known when
        ping stopped: every one up to the last answered. SIGINT ends ping at once, so the
        requests still in flight then (after the last reply) are not losses; a request
        lost while the stream went on always has a later one answered."""
        found = re.search(r"(\d+) packets transmitted", self.summary)
        assert found, f"no ping summary: {self.summary!r}"
        answered = {int(n) for n in re.findall(r"bytes from .* icmp_seq=(\d+) ", self.output)}
        if not answered:
            return 100.0
        known = max(answered)
        return 100.0 * (known - len(answered)) / known


def iperf3_server(ns: str) -> subprocess.Popen[bytes]:
    """A one-shot iperf3 server (`-s -1`) in a namespace, listening when this returns (a
    client started at once on a loaded machine found no server yet)."""
    server = subprocess.Popen(["ip", "netns", "exec", ns, "iperf3", "-s", "-1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and server.poll() is None:
        listening = subprocess.run(["ip", "netns", "exec", ns, "ss", "-Htln", "sport", "=",
                                    ":5201"], capture_output=True, text=True, check=False)
        if listening.stdout.strip():
            break
        time.sleep(0.05)
    return server


# ---- captures ---------------------------------------------------------------------------
def tcpdump(ns: str, path: Path, *expression: str, iface: str = "br0",
            snaplen: int | None = 200) -> subprocess.Popen[bytes]:
    """tcpdump on `iface` in a namespace, writing every packet to `path` as it comes (-U);
    `snaplen` bytes of each (None: tcpdump's default, the whole packet)."""
    size = ["-s", str(snaplen)] if snaplen is not None else []
    return subprocess.Popen(["ip", "netns", "exec", ns, "tcpdump", "-i", iface, "-n", *size,
                             "-w", str(path), "-U", *expression],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


class UnderlayCapture:
    """tcpdump on the underlay bridge (headers only: enough to see any clear pod packet)
    from now until stop()."""

    def __init__(self, bed: Testbed, path: Path) -> None:
        self.bed, self.path = bed, path
        self.clear_lines: list[str] = []  # what counted as clear (for the assertion)
        self.proc = tcpdump(bed.underlay_ns, path, snaplen=128)
        time.sleep(1.0)

    def stop(self) -> dict[str, int]:
        """Stop and count: every IPv4 packet must be ESP between node addresses, or the
        agents' channel (UDP 4501 between node addresses, Noise-encrypted); anything else,
        or any pod address (198.18.), counts as clear."""
        time.sleep(0.5)
        self.proc.terminate()
        self.proc.wait(timeout=10)
        text = subprocess.run(["tcpdump", "-n", "-r", str(self.path)], capture_output=True,
                              text=True, check=False).stdout
        node_addrs = {str(a.ip) for n in self.bed.nodes for a in n.underlay}
        esp = channel = clear = 0
        port = f".{CHANNEL_PORT}"
        for line in text.splitlines():
            if "198.18." in line:
                clear += 1
                self.clear_lines.append(line)
            if " IP " not in line:
                continue
            src, dst = line.split(" IP ")[1].split(":")[0].split(" > ")
            if "ESP(" in line and src in node_addrs and dst in node_addrs:
                esp += 1
            elif " UDP," in line and src.endswith(port) and dst.endswith(port) and \
                    src.removesuffix(port) in node_addrs and dst.removesuffix(port) in node_addrs:
                channel += 1
            elif f"udp port {CHANNEL_PORT} unreachable" in line and src in node_addrs and \
                    dst in node_addrs:
                # VPP's answer to a channel datagram while no agent listens (an agent
                # restart): it quotes the datagram's clear header and ciphertext only.
                channel += 1
            else:
                clear += 1
                self.clear_lines.append(line)
        return {"esp": esp, "channel": channel, "clear": clear}


# ---- the API's bytes against vpp-papi's -------------------------------------------------
def channel_of(api: VppClient) -> Any:
    """The connected client's API channel (its encoders, decoders and vpp-papi's)."""
    channel = api._channel
    assert channel is not None
    return channel


def assert_encodes_like_papi(channel: Any, requests: Iterable[Request]) -> None:
    for request in requests:
        assert channel.encode(request.name, request.args, 7) == \
            channel.reference_encode(request.name, request.args, 7), request.name


def assert_decodes_like_papi(channel: Any, raws: Iterable[bytes]) -> None:
    for raw in raws:
        assert channel.decode(raw) == channel.reference_decode(raw)

"""The storm's moving parts on the namespace testbed (vppmesh/lab/testbed.py): the agents
and the pods as users run them, the pods' traffic, the underlay capture, the samplers and
the faults.

Pods are added by the CNI plugin (vppmesh-cni ADD, host-local IPAM), as a node's container
runtime adds them, and each agent runs with `--cni-state-dir` on the plugin's records: after
a VPP restart the agent puts the pods back itself (vppmesh/cni/reattach.py). The rig only
restarts VPP with its uplink, as a supervisor (systemd and startup.conf) would.

Root and a VPP (VPPMESH_VPP) are needed; everything lives in namespaces of PREFIX and is
removed afterwards. What the run records (pings, TCP logs, capture, agent logs) goes to a
work directory outside the testbed's, so it survives the teardown.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from benchmarks.storm import analysis
from benchmarks.storm.schedule import Fault
from vppmesh.agent.clock import AgentClock
from vppmesh.cni.models import ERR_TRY_AGAIN
from vppmesh.dataplane.vpp import ipsec
from vppmesh.dataplane.vpp.client import VppClient
from vppmesh.keying.epochs import GenerationStore
from vppmesh.keying.pairs import pair_secrecy
from vppmesh.lab.etcd import EtcdServer, start_etcd, stop_etcd
from vppmesh.lab.testbed import NodeHandle, Testbed, TestbedSpec, in_ns, sh
from vppmesh.lab.wallclock import wall_stepped

PREFIX = "vst-"
BASE = Path("/run/vppmesh-storm")
METRICS = "127.0.0.1:9477"  # each agent's, inside its node's namespace
TCP_PORT = 5201
PING_INTERVAL = 0.01  # 100 pps per pair
NFT_TABLE = "vppmesh_storm"
OUTSIDE = "192.0.2.200"  # the attacker's own address on the underlay: no node has it
HERE = Path(__file__).parent
ETCD_PORTS = (2379, 2380)  # etcd's own, in its namespace
CNI_NETWORK = "vppmesh"
ADD_TIMEOUT = 180.0  # seconds an ADD is retried while the node has no mesh yet


def log(message: str) -> None:
    print(f"[storm {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def stop(proc: subprocess.Popen[Any] | None, sig: int = signal.SIGTERM,
         grace: float = 10.0) -> None:
    """Signal a process we started and reap it (SIGKILL after `grace`)."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


def cni_state_dir(node: NodeHandle) -> Path:
    """Where the node's CNI plugin keeps its pod records and its agent reads them."""
    return node.dir / "cni"


def pod_container(node: NodeHandle) -> str:
    """The container ID of the node's pod (what a runtime passes as CNI_CONTAINERID)."""
    return f"5701{node.index:04d}" * 4


def pod_netconf(bed: Testbed, node: NodeHandle, work: Path) -> dict[str, Any]:
    """The plugin's network configuration on one node, as its runtime hands it over: the
    node's VPP and mesh file, the records where the agent reads them, the testbed's
    attachment, and host-local IPAM over one address, the testbed's pod address, so the
    pings and streams know where every pod is (the ADD result is checked against it).
    The plugin's log goes to the work directory."""
    address = str(node.pod_address(0))
    return {"cniVersion": "1.0.0", "name": CNI_NETWORK, "type": "vppmesh-cni",
            "apiSocket": str(node.instance.api_socket), "mesh": str(bed.mesh_file),
            "node": node.name, "stateDir": str(cni_state_dir(node)),
            "attachment": bed.spec.attachment, "logFile": str(work / f"cni-{node.name}.log"),
            "ipam": {"type": "host-local", "dataDir": str(node.dir / "ipam"),
                     "ranges": [[{"subnet": str(node.pod_cidr), "rangeStart": address,
                                  "rangeEnd": address}]]}}


def added_address(result: dict[str, Any]) -> str:
    """The pod's address in an ADD result."""
    return str(result["ips"][0]["address"]).split("/")[0]


class Agent:
    """`vppmesh up --watch --metrics --cni-state-dir` for one node, in its namespace,
    logging to the work directory; optionally with its wall clock stepped. With
    `datastore` (an etcd URL) the node registers there as users run it (`--datastore`,
    the default lease TTL), under the testbed's node number and with the testbed's mesh
    file as its `--settings`."""

    def __init__(self, bed: Testbed, node: NodeHandle, work: Path,
                 datastore: str | None = None) -> None:
        self.bed, self.node = bed, node
        self.log = work / f"agent-{node.name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.lives = 0
        self.datastore = datastore

    def start(self, wall_step: float | None = None) -> None:
        bed, node = self.bed, self.node
        args = ["up", "--watch", *bed.vppmesh_args(node), *bed.state_args(node),
                "--metrics", METRICS, "--cni-state-dir", str(cni_state_dir(node))]
        if self.datastore is not None:
            args += ["--datastore", self.datastore, "--node-number", str(node.index),
                     "--pod-cidr", str(node.pod_cidr), "--settings", str(bed.mesh_file),
                     *(a for address in node.underlay for a in ("--underlay", str(address)))]
            if node.nat is not None:
                args += ["--nat-public", f"{node.nat.public}:{node.nat.port}"]
        head = [sys.executable, "-m", "vppmesh"] if wall_step is None else \
            wall_stepped(wall_step)
        with self.log.open("ab") as out:
            out.write(f"\n==== storm: agent started at {time.time():.3f}"
                      f"{'' if wall_step is None else f' wall clock {wall_step:+.0f} s'}\n"
                      .encode())
            out.flush()
            self.proc = subprocess.Popen(["ip", "netns", "exec", node.netns, *head, *args],
                                         stdout=out, stderr=subprocess.STDOUT)
        self.lives += 1

    def signal(self, sig: int) -> None:
        stop(self.proc, sig)
        self.proc = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None and self.proc.poll() is None else None


class Storm:
    def __init__(self, *, nodes: int, work: Path, key_max_seconds: int = 60,
                 prefix: str = PREFIX, base_dir: Path = BASE, nat: str = "none",
                 datastore: bool = False) -> None:
        # No testbed pods (`vppmesh attach` keeps no record): the CNI plugin adds them.
        self.spec = TestbedSpec(nodes=nodes, tunnels=2, pods=0, workers=0, prefix=prefix,
                                base_dir=base_dir, nat=nat)  # type: ignore[arg-type]
        self.bed = Testbed(self.spec)
        self.work = work
        self.key_max_seconds = key_max_seconds
        self.agents: dict[str, Agent] = {}
        self.procs: list[subprocess.Popen[Any]] = []
        self.pings: dict[str, tuple[subprocess.Popen[Any], Path]] = {}
        self.capture: subprocess.Popen[Any] | None = None
        self.capture_path = work / "underlay.pcap"
        self.key_samples: list[dict[str, Any]] = []
        self.agent_samples: dict[str, list[dict[str, Any]]] = {}
        self.vpp_samples: dict[str, list[dict[str, Any]]] = {}
        self.metric_samples: dict[str, list[dict[str, Any]]] = {}
        self.injections: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.mesh_text = ""
        self.heap_start: dict[str, int] = {}
        self.heap_end: dict[str, int] = {}
        self.datastore = datastore
        self.etcd: EtcdServer | None = None
        self.etcd_ns = f"{prefix}etcd"
        self.etcd_url: str | None = None
        self.etcd_address = ""
        self.pods: dict[str, dict[str, Any]] = {}  # node: its pod's ADD result

    # ---- building ----------------------------------------------------------------------
    def build(self) -> None:
        log(f"testbed: {self.spec.nodes} nodes, 2 tunnels per pair (prefix {self.spec.prefix})"
            + (", membership in etcd" if self.datastore else ""))
        self.bed.up(progress=log, join=not self.datastore)
        data = yaml.safe_load(self.bed.mesh_file.read_text())
        # Rekeys at half of key_max_seconds (every 30 s): a storm full of rotations, and a
        # UDP 4501 outage can outlast a key's life.
        data["settings"].update(rekey_interval=0, key_max_seconds=self.key_max_seconds,
                                rekey_grace=2.0)
        self.mesh_text = yaml.safe_dump(data, sort_keys=False)
        self.write_mesh(self.mesh_text)
        if self.datastore:
            self.start_etcd_on_management_network()
        for node in self.bed.nodes:
            agent = Agent(self.bed, node, self.work, self.etcd_url)
            agent.start()
            self.agents[node.name] = agent
        for node in self.bed.nodes:
            self.add_pod(node)

    def add_pod(self, node: NodeHandle, timeout: float = ADD_TIMEOUT) -> None:
        """The node's pod: an empty namespace, then the CNI plugin's ADD in the node's
        namespace, as its runtime runs it, retried as a runtime does while the plugin
        answers "try again" (code 11: with a datastore the agent has not made the mesh
        yet)."""
        from vppmesh.testing.vpp_helpers import run_cni

        ns = node.pod_netns(0)
        sh("ip", "netns", "add", ns)
        in_ns(ns, "ip", "link", "set", "lo", "up")
        deadline = time.time() + timeout
        while True:
            done = run_cni(node.netns, "ADD", pod_netconf(self.bed, node, self.work),
                           container=pod_container(node), netns=ns, pod=node.pod_name(0))
            try:
                result = json.loads(done.stdout) if done.stdout.strip() else {}
            except ValueError:
                result = {}
            if done.returncode == 0:
                break
            if result.get("code") != ERR_TRY_AGAIN or time.time() > deadline:
                raise RuntimeError(f"CNI ADD on {node.name} failed ({done.returncode}): "
                                   f"{done.stdout.strip()} {done.stderr.strip()}"[-800:])
            time.sleep(1.0)
        if added_address(result) != str(node.pod_address(0)):
            raise RuntimeError(f"CNI ADD on {node.name} gave {added_address(result)}, not "
                               f"{node.pod_address(0)}: the pings would miss the pod")
        self.pods[node.name] = result

    # ---- the datastore -----------------------------------------------------------------
    def start_etcd_on_management_network(self) -> None:
        """etcd in its own namespace on a management network every node reaches (as in
        tests/test_datastore_vpp.py); its data and log in the work directory, so a
        restart resumes its keys and the log outlives the testbed."""
        from vppmesh.testing.vpp_helpers import ETCD_ADDRESS, management_network

        management_network(self.bed, self.etcd_ns)
        (self.work / "etcd").mkdir(exist_ok=True)
        self.etcd_address = ETCD_ADDRESS
        self.start_etcd()
        self.etcd_url = f"etcd://{ETCD_ADDRESS}:{ETCD_PORTS[0]}/vppmesh"

    def start_etcd(self) -> None:
        self.etcd = start_etcd(self.etcd_address, wrap=["ip", "netns", "exec", self.etcd_ns],
                               data_dir=self.work / "etcd", ports=ETCD_PORTS)

    def in_etcd(self, code: str) -> str:
        """A Python snippet run where etcd is reachable (its namespace) against the mesh's
        store (`store`); its stdout."""
        head = ("from vppmesh.agent.datastore.etcd import EtcdStore, b64\n"
                "from vppmesh.agent.datastore.records import DatastoreUrl\n"
                f"store = EtcdStore(DatastoreUrl.parse({self.etcd_url!r}))\n")
        return in_ns(self.etcd_ns, sys.executable, "-c", head + code, check=True,
                     timeout=60).stdout


    def write_mesh(self, text: str) -> None:
        """Replace the mesh file atomically (as an operator's tooling would)."""
        tmp = self.bed.mesh_file.with_suffix(".tmp")
        tmp.write_text(text)
        os.replace(tmp, self.bed.mesh_file)

    def wait_agreed(self, timeout: float) -> float | None:
        start = time.time()
        while time.time() - start < timeout:
            sample = self.key_sample()
            if analysis.all_agreed(sample):
                return time.time() - start
            time.sleep(1.0)
        return None

    # ---- traffic and capture -----------------------------------------------------------
    def start_capture(self) -> None:
        self.capture = subprocess.Popen(
            ["ip", "netns", "exec", self.bed.underlay_ns, "tcpdump", "-i", "br0", "-n", "-s",
             "128", "-w", str(self.capture_path), "-U"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(1.0)

    def start_traffic(self) -> None:
        nodes = self.bed.nodes
        for node in nodes:
            ns = node.pod_netns(0)
            recv_log = self.work / f"tcp-{node.name}.jsonl"
            self.procs.append(subprocess.Popen(
                ["ip", "netns", "exec", ns, sys.executable, str(HERE / "tcp_stream.py"), "recv",
                 str(TCP_PORT), str(recv_log)], stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL))
        time.sleep(1.0)
        for src in nodes:
            dsts = [str(d.pod_address(0)) for d in nodes if d is not src]
            self.procs.append(subprocess.Popen(
                ["ip", "netns", "exec", src.pod_netns(0), sys.executable,
                 str(HERE / "tcp_stream.py"), "send", src.name, str(TCP_PORT), *dsts],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            for dst in nodes:
                if dst is src:
                    continue
                path = self.work / f"ping-{src.name}-{dst.name}.txt"
                out = path.open("w")
                proc = subprocess.Popen(
                    ["ip", "netns", "exec", src.pod_netns(0), "ping", "-n", "-D", "-i",
                     f"{PING_INTERVAL:g}", str(dst.pod_address(0))],
                    stdout=out, stderr=subprocess.STDOUT)
                out.close()
                self.pings[f"{src.name}->{dst.name}"] = (proc, path)

    def stop_traffic(self) -> None:
        for proc, _ in self.pings.values():
            stop(proc, signal.SIGINT)
        for proc in self.procs:
            stop(proc, signal.SIGTERM, grace=3)
        self.procs = []
        time.sleep(0.5)
        stop(self.capture, signal.SIGTERM)

    # ---- samplers ----------------------------------------------------------------------
    def key_sample(self) -> dict[str, Any]:
        """Per unordered pair: agreed both ways and not stopped; per direction the key's
        age on the node's clock."""
        names = [n.name for n in self.bed.nodes]
        directions: dict[tuple[str, str], dict[str, Any]] = {}
        for node in self.bed.nodes:
            try:
                state = GenerationStore(node.dir, node.name).load()
                now = AgentClock(node.dir / f"{node.name}.clock.json")()
            except Exception:  # a file being replaced: no sample this time
                continue
            found = pair_secrecy(state, [p for p in names if p != node.name])
            for peer, secrecy in found.items():
                age = now - secrecy.key_since if secrecy.key_since is not None else None
                directions[(node.name, peer)] = {
                    "agreed": secrecy.forward_secret and secrecy.stopped_since is None,
                    "stopped": secrecy.stopped_since is not None,
                    "age": age if secrecy.stopped_since is None else None,
                    "generation": secrecy.generation}
        pairs = {}
        for i, a in enumerate(names):
            for b in names[i + 1:]:
                ab, ba = directions.get((a, b)), directions.get((b, a))
                pairs[f"{a}-{b}"] = {
                    "agreed": bool(ab and ba and ab["agreed"] and ba["agreed"]),
                    "stopped": bool((ab and ab["stopped"]) or (ba and ba["stopped"])),
                    "age": max((d["age"] for d in (ab, ba) if d and d["age"] is not None),
                               default=None)}
        return {"t": time.time(), "pairs": pairs}

    def resource_sample(self) -> None:
        now = time.time()
        for name, agent in self.agents.items():
            pid = agent.pid
            if pid is None:
                continue
            try:
                status = Path(f"/proc/{pid}/status").read_text()
                rss = int(re.search(r"VmRSS:\s+(\d+)", status).group(1))  # type: ignore[union-attr]
                fds = len(os.listdir(f"/proc/{pid}/fd"))
            except (OSError, AttributeError):
                continue
            self.agent_samples.setdefault(name, []).append(
                {"t": now, "rss_kib": rss, "fds": fds, "life": agent.lives})
        for node in self.bed.nodes:
            try:
                with VppClient(node.instance.api_socket, timeout=3).connect() as api:
                    asked = time.time()
                    sas = len(ipsec.dump_sas(api))
                    took = time.time() - asked
            except Exception:  # VPP restarting: no sample
                continue
            self.vpp_samples.setdefault(node.name, []).append(
                {"t": now, "sas": sas, "dump_s": took})

    def heap_sample(self) -> dict[str, int]:
        """Each VPP's main heap in use. Only before the traffic starts and after it stops:
        `show memory` holds VPP's main thread (which forwards, with no workers) for up to
        half a second, which the pods' pings saw as an outage when it ran every 10 s."""
        found = {}
        for node in self.bed.nodes:
            try:
                with VppClient(node.instance.api_socket, timeout=10).connect() as api:
                    found[node.name] = heap_used(api)
            except Exception:  # VPP not answering: no sample
                continue
        return found

    def metrics_sample(self) -> None:
        for name, agent in self.agents.items():
            if agent.pid is None:
                continue
            try:
                text = in_ns(agent.node.netns, sys.executable, "-c",
                             "import urllib.request,sys; sys.stdout.write(urllib.request."
                             f"urlopen('http://{METRICS}/metrics', timeout=5).read().decode())",
                             check=True, timeout=20).stdout
            except Exception:  # agent (re)starting
                continue
            wanted = {}
            for line in text.splitlines():
                if line.startswith(("vppmesh_channel_dropped_total", "vppmesh_esp_errors",
                                    "vppmesh_guard_dropped",
                                    "vppmesh_forward_secrecy_downgrades_total",
                                    "vppmesh_reconcile_errors_total")):
                    series, _, value = line.rpartition(" ")
                    with contextlib.suppress(ValueError):
                        wanted[series] = float(value)
            self.metric_samples.setdefault(name, []).append(
                {"t": time.time(), "life": agent.lives, "values": wanted})

    def start_samplers(self) -> None:
        def every(seconds: float, fn: Callable[[], None]) -> None:
            while not self._stop.wait(seconds):
                try:
                    fn()
                except Exception as exc:  # a sampler must not end the storm
                    log(f"sampler {fn.__name__}: {exc}")

        def keys() -> None:
            self.key_samples.append(self.key_sample())

        for seconds, fn in ((2.0, keys), (10.0, self.resource_sample),
                            (30.0, self.metrics_sample)):
            thread = threading.Thread(target=every, args=(seconds, fn), daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop_samplers(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=60)

    # ---- faults ------------------------------------------------------------------------
    def nft(self, rule: str | None) -> None:
        subprocess.run(["ip", "netns", "exec", self.bed.underlay_ns, "nft", "delete", "table",
                        "bridge", NFT_TABLE], capture_output=True, check=False, timeout=30)
        if rule is None:
            return
        script = (f"table bridge {NFT_TABLE} {{\n chain forward {{\n"
                  f"  type filter hook forward priority 0; policy accept;\n  {rule}\n }}\n}}\n")
        subprocess.run(["ip", "netns", "exec", self.bed.underlay_ns, "nft", "-f", "-"],
                       input=script, text=True, check=True, timeout=30)

    def apply(self, fault: Fault, record: dict[str, Any]) -> None:
        """Inflict one fault, hold it, undo it; `record` gets `started` and `restored`."""
        node = self.bed.nodes[fault.node - 1]
        agent = self.agents[node.name]
        ul = self.bed.underlay_ns
        # The bridge port a node's underlay traffic crosses: a node behind the NAT router
        # reaches the bridge through the router's own port.
        port = "ul-nat" if node.behind_nat else f"ul-{node.name}"
        record["started"] = time.time()
        kind = fault.kind
        if kind in ("vpp_kill", "vpp_agent_stop") and agent.log.exists():
            record["agent_log_from"] = agent.log.stat().st_size  # note_agent_log reads on
        if kind in ("agent_kill", "agent_term"):
            agent.signal(signal.SIGKILL if kind == "agent_kill" else signal.SIGTERM)
            time.sleep(fault.duration)
            agent.start()
        elif kind == "vpp_kill":
            # A crash and its supervisor: a fresh VPP with its uplink (startup.conf). The
            # agent notices, programs the mesh and re-attaches the pod from its record.
            self.bed.kill_vpp(node, signal.SIGKILL)
            record["vpp_dead"] = time.time()
            self.bed.restart_vpp(node)
        elif kind == "vpp_agent_stop":
            agent.signal(signal.SIGTERM)
            self.bed.kill_vpp(node, signal.SIGTERM)
            time.sleep(fault.duration)
            self.bed.restart_vpp(node)
            agent.start()
        elif kind == "peer_leave" and self.datastore:
            # Its agent stopped and its record deleted (what its lease's expiry or
            # `vppmesh down` does to the record); the agent started again registers anew.
            agent.signal(signal.SIGTERM)
            self.in_etcd(f"assert store.deregister({node.name!r})")
            time.sleep(fault.duration)
            agent.start()
        elif kind == "peer_leave":
            agent.signal(signal.SIGTERM)
            data = yaml.safe_load(self.mesh_text)
            data["nodes"] = [n for n in data["nodes"] if n["name"] != node.name]
            self.write_mesh(yaml.safe_dump(data, sort_keys=False))
            time.sleep(fault.duration)
            self.write_mesh(self.mesh_text)
            agent.start()
        elif kind == "torn_write":
            with self.bed.mesh_file.open("w") as f:  # in place: what a crash mid-write leaves
                f.write(self.mesh_text[: len(self.mesh_text) // 2])
            time.sleep(fault.duration)
            with self.bed.mesh_file.open("w") as f:
                f.write(self.mesh_text)
        elif kind == "etcd_restart":
            assert self.etcd is not None
            stop_etcd(self.etcd, int(fault.param))
            time.sleep(fault.duration)
            self.start_etcd()
        elif kind == "torn_record":
            # Beside the victim's record: a copy cut half-way, then the whole copy (it
            # claims the victim's number, key and addresses), then gone. Every agent must
            # refuse both and keep the mesh.
            torn = f"{node.name}-torn"
            copy = ("from vppmesh.agent.datastore.records import encode_record, parse_record\n"
                    f"[r] = [r for r in store.snapshot().records if r.name == {node.name!r}]\n"
                    f"value = encode_record(parse_record(r).model_copy(update={{'name': "
                    f"{torn!r}}}))\nkey = b64(store.url.node_key({torn!r}))\n")
            self.in_etcd(copy + "store._post('/kv/put', {'key': key, "
                         "'value': b64(value[:len(value) // 2])})")
            time.sleep(fault.duration)
            self.in_etcd(copy + "store._post('/kv/put', {'key': key, 'value': b64(value)})")
            time.sleep(2.0)
            self.in_etcd(copy + "store._post('/kv/deleterange', {'key': key})")
        elif kind == "link_down":
            in_ns(ul, "ip", "link", "set", port, "down")
            time.sleep(fault.duration)
            in_ns(ul, "ip", "link", "set", port, "up")
        elif kind == "netem":
            netem = in_ns(ul, "tc", "qdisc", "add", "dev", port, "root", "netem", "delay",
                          "50ms", "50ms", "loss", "30%", check=False)
            if netem.returncode == 0:
                record["applied"] = "netem: 30 % loss, 50 ms +- 50 ms delay"
            else:
                # A kernel without sch_netem (these machines): the loss alone, both ways,
                # by nftables on the bridge; the record says the delay is missing.
                self.nft(f'iifname "{port}" numgen random mod 100 < 30 drop\n'
                         f'  oifname "{port}" numgen random mod 100 < 30 drop')
                record["applied"] = ("nftables: 30 % loss both ways; no delay (this kernel "
                                     f"has no sch_netem: {netem.stderr.strip()[:80]})")
            time.sleep(fault.duration)
            in_ns(ul, "tc", "qdisc", "del", "dev", port, "root", check=False)
            self.nft(None)
        elif kind in ("channel_drop", "kex_drop"):
            rule = "udp dport 4501 drop" if kind == "channel_drop" else \
                "udp dport 4501 udp length 79 drop"
            self.nft(rule)
            time.sleep(fault.duration)
            self.nft(None)
        elif kind == "replay_spoof":
            # Recorded first: the channel's datagrams (rekeys every 30 s, keepalives) for up
            # to 12 s, then a moment of ESP.
            recorded = []
            for what, count, seconds in (("udp port 4501", 40, 12), ("ip proto 50", 200, 5)):
                pcap = self.work / f"recorded-{len(self.injections)}-{len(recorded)}.pcap"
                in_ns(ul, "timeout", str(seconds), "tcpdump", "-i", "br0", "-n", "-c",
                      str(count), "-w", str(pcap), what, check=False, timeout=60)
                recorded.append(str(pcap))
            sent = in_ns(ul, sys.executable, str(HERE / "packets.py"), "br0",
                         ",".join(recorded), OUTSIDE, "20", check=True, timeout=120).stdout
            record["sent"] = json.loads(sent.strip().splitlines()[-1])
            self.injections.append(record["sent"])
        elif kind == "nat_flush":
            in_ns(self.bed.nat_ns, "conntrack", "-F", check=True)
        elif kind == "clock_step":
            agent.signal(signal.SIGTERM)
            agent.start(wall_step=fault.param)
            time.sleep(fault.duration)
            agent.signal(signal.SIGTERM)
            agent.start()
        else:
            raise ValueError(f"unknown fault kind {kind}")
        record.setdefault("restored", time.time())

    def note_agent_log(self, fault: Fault, record: dict[str, Any], lines: int = 40) -> None:
        """VPP faults: what the victim's agent logged from the fault on (its recovery's
        timeline: VPP gone, back, mesh programmed, pods re-attached, keys agreed)."""
        if fault.kind not in ("vpp_kill", "vpp_agent_stop"):
            return
        path = self.agents[self.bed.nodes[fault.node - 1].name].log
        with contextlib.suppress(OSError), path.open("rb") as f:
            f.seek(record.pop("agent_log_from", 0))
            record["agent_log"] = f.read().decode(errors="replace").splitlines()[:lines]

    def check_agents(self) -> list[str]:
        """Agents that exited on their own (a product failure: recorded with the end of
        their log), started again so the storm goes on."""
        found = []
        for name, agent in self.agents.items():
            if agent.proc is not None and agent.proc.poll() is not None:
                tail = agent.log.read_text(errors="replace")[-1500:]
                found.append(f"{name}'s agent exited ({agent.proc.returncode}): {tail}")
                log(f"  {name}'s agent exited with {agent.proc.returncode}: restarting it")
                agent.start()
        return found

    # ---- tearing down ------------------------------------------------------------------
    def teardown(self) -> None:
        self._stop.set()
        self.stop_traffic()
        if not self.heap_end:
            self.heap_end = self.heap_sample()
        for agent in self.agents.values():
            agent.signal(signal.SIGTERM)
        self.nft(None)
        if self.etcd is not None:
            stop_etcd(self.etcd)
        self.bed.down(quiet=True)


def heap_used(api: VppClient) -> int:
    """Bytes in use on VPP's main heap (`show memory main-heap`)."""
    text = api.cli("show memory main-heap")
    match = re.search(r"used: ([\d.]+)([KMGT]?)", text)
    if match is None:
        return 0
    scale = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}[match.group(2)]
    return int(float(match.group(1)) * scale)

"""The README's quick start, run as written on testbed hosts with the real VPP.

The commands come from README.md itself (its "Quick start on real hosts" section), not
from a copy, and run in order: a fresh virtualenv, a plain (non-editable) `pip install .`,
render-startup from the installed package, keygen, the mesh file filled in from the
README's template, the systemd unit from `vppmesh install-unit`, whose ExecStart line
runs the agent (it takes each host's NIC), then `vppmesh verify`, which must PASS.

What a test bed cannot do is stood in for, and listed in HOST_SETUP: VPP's packages and
their hold (the testbed runs VPPMESH_VPP with the testbed profile), the symlink onto
PATH (the venv's bin is on PATH instead) and systemd (the unit's ExecStart runs in the
node's namespace).
Paths under /etc and /var are the node's directory here, given through the environment
variables the commands read (VPPMESH_MESH, VPPMESH_KEY, ...) and substituted in the
command lines. Each testbed host starts as the quick start expects: VPP running with no
uplink, the host's NIC eth0 holding the host's own address.

Skipped with the reason when no VPP binary is found or when not root.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shlex
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from benchmarks.netns import stop_process
from vppmesh.dataplane import engines
from vppmesh.dataplane.startup import Instance, load_profile, render
from vppmesh.dataplane.state import is_owned_sa_id, is_owned_tunnel_instance
from vppmesh.dataplane.vpp import compat, host_interfaces, interfaces, ipip, ipsec, routes
from vppmesh.dataplane.vpp.client import VppClient
from vppmesh.dataplane.vpp.compat import VppIncompatibleError
from vppmesh.errors import ConfigError
from vppmesh.lab.testbed import (
    UPLINK_IFNAME,
    NodeHandle,
    Testbed,
    destroy,
    find_vpp,
    in_ns,
    sh,
    start_vpp,
)
from vppmesh.testing import vpp_helpers
from vppmesh.testing.etcd_server import require_etcd
from vppmesh.testing.vpp_helpers import (
    etcd_url,
    iperf3_server,
    management_etcd,
    on_demand_rekeys,
    ping_ok,
    plan_changes,
    require_vpp,
    settled_on_agreed_keys,
    start_datastore_agent,
)
from vppmesh.testing.wait import wait_for

PREFIX = "vqs-"
BASE = Path("/run/vppmesh-vqs")
ROOT = Path(__file__).resolve().parent.parent
HOST_SETUP = ("curl ", "apt-get ", "apt-mark ", "ln ", "systemctl ")


# ---- the quick start, from README.md ----------------------------------------------------
def quick_start() -> list[tuple[str, str]]:
    """The quick start's steps in README order: ("sh", command) or ("yaml", mesh file)."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Quick start on real hosts", 1)[1].split("\n## ", 1)[0]
    steps: list[tuple[str, str]] = []
    for kind, body in re.findall(r"```(sh|yaml)\n(.*?)```", section, re.S):
        body = textwrap.dedent(body)
        if kind == "yaml":
            steps.append((kind, body))
            continue
        for line in body.replace("\\\n", " ").splitlines():
            if line.strip():
                steps.append((kind, " ".join(line.split())))
    return steps


def test_quick_start_has_every_step_in_a_working_order() -> None:
    """No VPP needed: the README's steps are the ones the real test knows how to run."""
    steps = quick_start()
    commands = [c for kind, c in steps if kind == "sh"]
    first = {name: next(i for i, c in enumerate(commands) if name in c)
             for name in ("apt-get install", "apt-mark hold", "python3 -m venv", "pip install .",
                          "render-startup", "keygen", "install-unit", "enable --now",
                          "verify")}
    assert list(first) == sorted(first, key=first.__getitem__), first
    apt = next(c for c in commands if c.startswith("apt-get install"))
    for package in ("vpp=", "vpp-plugin-core=", "vpp-crypto-engines=", "vpp-drivers="):
        assert package in apt
    # What apt-get pinned stays pinned: `apt upgrade` must not move VPP off the release.
    hold = next(c for c in commands if c.startswith("apt-mark hold")).split()[2:]
    assert sorted(hold) == sorted(w.split("=")[0] for w in apt.split() if "=" in w), hold
    assert "pip install -e" not in " ".join(commands)
    mesh_at = next(i for i, (kind, _) in enumerate(steps) if kind == "yaml")
    keygen_at = next(i for i, (_, c) in enumerate(steps) if "keygen" in c)
    unit_at = next(i for i, (_, c) in enumerate(steps) if "install-unit" in c)
    assert keygen_at < mesh_at < unit_at
    for command in commands:
        assert command.startswith((*HOST_SETUP, "python3 ", "/opt/vppmesh/bin/pip ",
                                   "vppmesh ", "(umask 077;")), command


# ---- running it --------------------------------------------------------------------------
def host_address(node: NodeHandle) -> str:
    """The host's own address on its NIC (VPP's underlay addresses are others)."""
    return f"192.0.2.{200 + node.index}/24"


class Host:
    """One testbed node as a quick-start host: its /etc and /var stand-ins and env."""

    def __init__(self, bed: Testbed, node: NodeHandle, venv: Path) -> None:
        self.node = node
        self.etc = node.dir / "etc"
        self.etc.mkdir(parents=True, exist_ok=True)
        self.unit = node.dir / "vppmesh.service"
        self.env = {
            **os.environ,
            "PATH": f"{venv / 'bin'}:{os.environ['PATH']}",
            "VPPMESH_MESH": str(self.etc / "mesh.yaml"),
            "VPPMESH_KEY": str(self.etc / "private.key"),
            "VPPMESH_STATE_DIR": str(node.dir / "state"),
            "VPPMESH_API_SOCKET": str(node.instance.api_socket),
            "VPPMESH_UNIT_FILE": str(self.unit),
        }
        self.env.pop("VIRTUAL_ENV", None)
        self.agent: subprocess.Popen[bytes] | None = None

    def substitute(self, command: str, venv: Path) -> str:
        return (command.replace("/etc/vppmesh", str(self.etc))
                .replace("/etc/vpp/", f"{self.etc}/vpp-")
                .replace("/opt/vppmesh", str(venv))
                .replace("node1", self.node.name))

    def run(self, command: str) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(["ip", "netns", "exec", self.node.netns, "bash", "-c",
                                 command], env=self.env, capture_output=True, text=True,
                                timeout=120, check=False)
        assert result.returncode == 0 or command.startswith("vppmesh verify"), \
            f"{command}: {result.stdout}{result.stderr}"
        return result

    def start_unit(self) -> None:
        """What `systemctl enable --now vppmesh` runs: the unit's ExecStart."""
        line = next(v for k, _, v in (ln.partition("=") for ln in
                                      self.unit.read_text().splitlines()) if k == "ExecStart")
        argv = shlex.split(line.replace("%%", "%").replace("$$", "$"))
        log = open(self.node.dir / "agent.log", "w")  # noqa: SIM115 - handed to the child
        self.agent = subprocess.Popen(["ip", "netns", "exec", self.node.netns, *argv],
                                      env=self.env, stdout=log, stderr=subprocess.STDOUT)

    def log(self) -> str:
        path = self.node.dir / "agent.log"
        return path.read_text() if path.exists() else ""


def fill_mesh(template: str, hosts: list[Host], public_keys: dict[str, str]) -> str:
    """The README's mesh file with the testbed's nodes in place of node1, node2, ..."""
    lines = [line for line in template.splitlines()
             if line.strip() not in ("...", "- name: node2")]
    data = yaml.safe_load("\n".join(lines).replace("<output of vppmesh keygen on node1>", "KEY"))
    example = data["nodes"][0]
    nodes = []
    for host in hosts:
        node = host.node
        nodes.append({**example, "name": node.name, "node_number": node.index,
                      "underlay": [str(a) for a in node.underlay],
                      "pod_cidr": str(node.pod_cidr), "public_key": public_keys[node.name]})
    return yaml.safe_dump({"settings": data["settings"], "nodes": nodes}, sort_keys=False)


@pytest.fixture
def bed() -> Iterator[Testbed]:
    with vpp_helpers.testbed(nodes=2, tunnels=4, pods=0, prefix=PREFIX, base_dir=BASE,
                 join=False) as built:
        for node in built.nodes:
            # As the quick start finds a host: VPP without uplink, the NIC the host's.
            with VppClient(node.instance.api_socket).connect() as api:
                api.call(host_interfaces.delete_af_packet(UPLINK_IFNAME))
            in_ns(node.netns, "ip", "addr", "add", host_address(node), "dev", UPLINK_IFNAME)
            in_ns(node.netns, "ip", "link", "set", UPLINK_IFNAME, "up")
        yield built


@pytest.mark.vpp
@pytest.mark.root
def test_quick_start_as_written(bed: Testbed) -> None:
    venv = BASE / "venv"
    hosts = [Host(bed, node, venv) for node in bed.nodes]
    public_keys: dict[str, str] = {}
    skipped: list[str] = []
    timings: dict[str, float] = {}
    started = time.monotonic()
    try:
        for kind, step in quick_start():
            if kind == "yaml":
                mesh = fill_mesh(step.replace("/etc/vppmesh", "/ETC"), hosts, public_keys)
                for host in hosts:  # "copy it to every node"
                    (host.etc / "mesh.yaml").write_text(mesh.replace("/ETC/", f"{host.etc}/"))
                continue
            if step.startswith("systemctl enable --now"):
                for host in hosts:
                    host.start_unit()
                for host in hosts:
                    try:
                        wait_for(lambda h=host: f"node {h.node.name}: " in h.log(),  # type: ignore[misc]
                                 60, f"{host.node.name}'s agent to program the mesh")
                    except AssertionError as exc:
                        raise AssertionError(f"{exc}:\n{host.log()[:6000]}") from None
                timings["agents"] = time.monotonic() - started
                skipped.append(step)
                continue
            if step.startswith(HOST_SETUP):
                skipped.append(step)
                continue
            began = time.monotonic()
            if step.startswith(("python3 ", "/opt/vppmesh/bin/pip ")):  # once per machine
                command = step.replace("/opt/vppmesh", str(venv))
                done = subprocess.run(["bash", "-c", command], cwd=ROOT, capture_output=True,
                                      text=True, timeout=600, check=False)
                assert done.returncode == 0, f"{command}: {done.stdout}{done.stderr}"
                timings[" ".join(step.split()[:3])] = time.monotonic() - began
                continue
            if "/etc/vppmesh/psk" in step:  # once for the mesh, copied with the mesh file
                hosts[0].run(hosts[0].substitute(step, venv))
                for host in hosts[1:]:
                    psk = host.etc / "psk"
                    psk.write_bytes((hosts[0].etc / "psk").read_bytes())
                    psk.chmod(0o600)
                continue
            for host in hosts:
                result = host.run(host.substitute(step, venv))
                if " keygen " in f" {step} ":
                    public_keys[host.node.name] = result.stdout.strip()
                if step.startswith("vppmesh render-startup"):
                    # The profile, from the installed package (the testbed's VPP runs the
                    # testbed profile: several VPPs share this machine's 2 cores).
                    conf = (host.etc / "vpp-startup.conf").read_text()
                    assert "plugin af_xdp_plugin.so { enable }" in conf
                    assert "  ipsecmb { enable }" in conf
                if step.startswith("vppmesh verify"):
                    assert result.returncode == 0, result.stdout + result.stderr + host.log()
                    assert "PASS" in result.stdout
                    # The agent runs: no warning that keys would not rotate.
                    assert "no `vppmesh up --watch` agent" not in result.stderr
                    timings["verify"] = time.monotonic() - started
        assert skipped == [c for k, c in quick_start() if k == "sh"
                           and c.startswith(HOST_SETUP)]
        installed = venv / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}"
        # Not editable: the package (and its profiles and unit) are in site-packages.
        assert list(installed.glob("site-packages/vppmesh/profiles/xl710-avf.yaml"))
        assert not list(installed.glob("site-packages/__editable__*"))
        for host in hosts:
            assert "--take-uplink eth0" in host.unit.read_text()
            assert (host.node.dir / "state" / f"uplink-{UPLINK_IFNAME}.json").exists()
        print("\nquick start timings (s from the first step): " +
              ", ".join(f"{k} {v:.1f}" for k, v in timings.items()))
    finally:
        for host in hosts:
            if host.agent is not None:
                stop_process(host.agent)


def mesh_ip(node: NodeHandle) -> str:
    """The node's host link address in the mesh (the first of its pod CIDR)."""
    return str(next(node.pod_cidr.hosts()))


def vppmesh(bed: Testbed, node: NodeHandle, *args: str) -> subprocess.CompletedProcess[str]:
    """This checkout's vppmesh in the node's namespace, with the testbed's files."""
    return in_ns(node.netns, sys.executable, "-m", "vppmesh", *args, *bed.vppmesh_args(node),
                 "--state-dir", str(node.dir), check=False, timeout=120)


def iperf_gbits(src: NodeHandle, dst: NodeHandle, seconds: int = 5) -> tuple[float, int]:
    """TCP from src's host link to dst's (4 streams): Gbit/s received, retransmits."""
    server = iperf3_server(dst.netns)
    try:
        time.sleep(0.5)
        out = in_ns(src.netns, "iperf3", "-c", mesh_ip(dst), "-t", str(seconds),
                    "-P", "4", "-J", check=False, timeout=seconds + 30).stdout
    finally:
        stop_process(server)
    end = json.loads(out)["end"]
    return end["sum_received"]["bits_per_second"] / 1e9, end["sum_sent"]["retransmits"]


@pytest.mark.vpp
@pytest.mark.root
def test_mesh_over_af_xdp_uplinks_and_restore(bed: Testbed) -> None:
    """`up --take-uplink eth0 --uplink-driver af_xdp`: the mesh runs over VPP's af_xdp
    NICs, and `uplink restore` gives each host its NIC back."""
    from vppmesh.testing.vpp_helpers import require_bpffs

    require_bpffs()
    for node in bed.nodes:
        done = vppmesh(bed, node, "up", "--key", str(node.key_file), "--host-link",
                       "af_packet", "--take-uplink", UPLINK_IFNAME, "--uplink-driver", "af_xdp")
        assert done.returncode == 0, done.stdout + done.stderr
        with VppClient(node.instance.api_socket).connect() as api:
            names = {i.name for i in interfaces.dump_interfaces(api)}
        assert f"xdp-{UPLINK_IFNAME}" in names
    n1, n2 = bed.nodes
    wait_for(lambda: ping_ok(n1.netns, mesh_ip(n2)), 10, "n1 -> n2 over the mesh")
    checked = vppmesh(bed, n1, "verify")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    # The host keeps its own address and reaches the other host, through VPP's bridge.
    assert ping_ok(n1.netns, host_address(n2).split("/")[0])
    gbits, retransmits = iperf_gbits(n1, n2)
    print(f"\naf_xdp uplinks: iperf3 host link n1 -> n2 over the mesh: {gbits:.3f} Gbit/s, "
          f"{retransmits} retransmits")
    assert gbits > 0
    for node in bed.nodes:
        restored = in_ns(node.netns, sys.executable, "-m", "vppmesh", "uplink", "restore",
                         "--api-socket", str(node.instance.api_socket), "--state-dir",
                         str(node.dir), check=False, timeout=60)
        assert restored.returncode == 0, restored.stdout + restored.stderr
        assert not (node.dir / f"uplink-{UPLINK_IFNAME}.json").exists()
        link = json.loads(in_ns(node.netns, "ip", "-j", "addr", "show", UPLINK_IFNAME).stdout)
        assert link[0]["link_type"] == "ether" and "UP" in link[0]["flags"]
        assert host_address(node).split("/")[0] in {a["local"] for a in link[0]["addr_info"]}
    # Linux's NIC again, no VPP in the path: the hosts still reach each other.
    wait_for(lambda: ping_ok(n1.netns, host_address(n2).split("/")[0]), 10, "host to host")


@pytest.mark.vpp
@pytest.mark.root
def test_uplink_option_alone_carries_traffic(bed: Testbed) -> None:
    """`uplink:` names a VPP interface with no address and down: `up` puts the underlay
    addresses on it and brings it up, and the mesh carries traffic."""
    data = yaml.safe_load(bed.mesh_file.read_text())
    for node in bed.nodes:
        with VppClient(node.instance.api_socket).connect() as api:
            api.call(host_interfaces.create_af_packet(UPLINK_IFNAME,
                                                      f"02:fe:aa:00:00:0{node.index}"))
        next(n for n in data["nodes"] if n["name"] == node.name)["uplink"] = \
            f"host-{UPLINK_IFNAME}"
    bed.mesh_file.write_text(yaml.safe_dump(data, sort_keys=False))
    for node in bed.nodes:
        done = vppmesh(bed, node, "up", "--key", str(node.key_file), "--host-link", "af_packet")
        assert done.returncode == 0, done.stdout + done.stderr
        assert "~ uplink admin up" in done.stdout
        with VppClient(node.instance.api_socket).connect() as api:
            uplink = next(i for i in interfaces.dump_interfaces(api)
                          if i.name == f"host-{UPLINK_IFNAME}")
            assert uplink.admin_up
            assert set(node.underlay) <= set(interfaces.dump_addresses(api, uplink.sw_if_index))
    n1, n2 = bed.nodes
    wait_for(lambda: ping_ok(n1.netns, mesh_ip(n2)), 10, "n1 -> n2 over the mesh")
    checked = vppmesh(bed, n2, "verify")
    assert checked.returncode == 0, checked.stdout + checked.stderr


def outbound_generations(node: NodeHandle) -> set[int]:
    """Key generations of the outbound SAs protecting the node's tunnels."""
    with VppClient(node.instance.api_socket).connect() as api:
        owned = {t.sw_if_index for t in ipip.dump_tunnels(api)
                 if is_owned_tunnel_instance(t.instance)}
        return {(sa_out >> 24) & 0xF for index, (sa_out, _) in
                ipsec.dump_protections(api).items() if index in owned}


@pytest.mark.vpp
@pytest.mark.root
def test_datastore_mode_rekey_verify_status_plan_down() -> None:
    """Every node command with --datastore, as in file mode; `down` leaves an operator's
    route in the mesh table, and so the table."""
    with vpp_helpers.testbed(require_etcd, join=False, prefix=PREFIX, base_dir=BASE, nodes=2,
                 tunnels=2, pods=0) as bed, management_etcd(bed, f"{PREFIX}etcd") as etcd:
        on_demand_rekeys(bed, grace=1.0)
        url = etcd_url(etcd)
        agents = {n.name: start_datastore_agent(bed, n, url) for n in bed.nodes}
        n1, n2 = bed.nodes

        def run(node: NodeHandle, *args: str) -> subprocess.CompletedProcess[str]:
            return in_ns(node.netns, sys.executable, "-m", "vppmesh", *args, "--datastore",
                         url, "--node", node.name, "--api-socket",
                         str(node.instance.api_socket), "--state-dir", str(node.dir),
                         check=False, timeout=120)

        try:
            wait_for(lambda: ping_ok(n1.netns, mesh_ip(n2)) and ping_ok(n2.netns, mesh_ip(n1)),
                     60, "the datastore mesh")
            checked = run(n1, "verify")
            assert checked.returncode == 0, checked.stdout + checked.stderr
            assert "PASS" in checked.stdout
            assert "no `vppmesh up --watch` agent" not in checked.stderr
            status = run(n1, "status")
            assert status.returncode == 0, status.stdout + status.stderr
            assert "n2" in status.stdout
            wait_for(lambda: settled_on_agreed_keys([n1, n2]), 60, "agreed keys both ways")
            planned = run(n1, "plan", "--key", str(n1.key_file))
            assert planned.returncode == 0, planned.stdout + planned.stderr
            assert plan_changes(planned.stdout) == 0, planned.stdout

            before = outbound_generations(n1)
            for _ in range(3):  # traffic both ways: n2 surely has the current generation
                ping_ok(n1.netns, mesh_ip(n2))
                time.sleep(1)
            rekeyed = run(n1, "rekey", "--key", str(n1.key_file))
            assert rekeyed.returncode == 0, rekeyed.stdout + rekeyed.stderr
            wait_for(lambda: outbound_generations(n1) == {max(before) + 1}, 30,
                     f"n1 sending on generation {max(before) + 1}")
            wait_for(lambda: ping_ok(n1.netns, mesh_ip(n2)), 10, "n1 -> n2 after the rekey")
            checked = run(n2, "verify")
            assert checked.returncode == 0, checked.stdout + checked.stderr

            stop_process(agents.pop(n1.name), grace=10.0)
            with VppClient(n1.instance.api_socket).connect() as api:
                table = bed.spec.mesh_table_id
                own = api.call(interfaces.create_loopback("02:00:00:00:00:0b")).sw_if_index
                api.call(routes.route(table, ipaddress.IPv4Network("10.99.0.0/16"),
                                      [own], True))
            down = run(n1, "down")
            assert down.returncode == 0, down.stdout + down.stderr
            assert f"kept table {table}: 1 route(s) in it are not vppmesh's" in down.stdout
            with VppClient(n1.instance.api_socket).connect() as api:
                assert not [t for t in ipip.dump_tunnels(api)
                            if is_owned_tunnel_instance(t.instance)]
                assert not [s for s in ipsec.dump_sas(api) if is_owned_sa_id(s.spec.sa_id)]
                kept = routes.dump_routes(api, table)
                assert list(kept) == [ipaddress.IPv4Network("10.99.0.0/16")]
            # n2 hears that n1 left (its record is gone) and removes its tunnels to it.
            wait_for(lambda: not outbound_generations(n2), 30, "n2 dropping n1's tunnels")
        finally:
            for proc in agents.values():
                stop_process(proc, grace=10.0)


@pytest.mark.vpp
@pytest.mark.root
def test_missing_crypto_engine_untested_release_and_changed_message_are_refused(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A VPP without crypto engines (no vpp-crypto-engines) makes `up` stop, naming the
    package; a release or an API message vppmesh does not know is refused at connect."""
    require_vpp()
    prefix, base = f"{PREFIX}x", BASE / "refused"
    instance = Instance(name=prefix, runtime_dir=base)
    profile = load_profile("testbed").model_copy(update={"crypto_engines": []})
    destroy(prefix, base, quiet=True)
    sh("ip", "netns", "add", prefix)
    try:
        start_vpp(find_vpp(), prefix, instance, base, render(profile, instance))
        with VppClient(instance.api_socket).connect() as api:
            assert api.vpp_version is not None and api.vpp_version.startswith("26.06")
            with pytest.raises(ConfigError, match=r"no crypto engine.*vpp-crypto-engines"):
                engines.ensure(api, "auto")
        with monkeypatch.context() as patched:
            patched.setitem(compat.CRCS, "ip_route_add_del", "0x00000000")
            with pytest.raises(VppIncompatibleError, match=r"ip_route_add_del \(VPP 0x"):
                VppClient(instance.api_socket).connect()
        with monkeypatch.context() as patched:
            patched.setattr(compat, "TESTED_RELEASES", ("25.10",))
            with pytest.raises(VppIncompatibleError,
                               match=r"VPP 26\.06.*tested: 25\.10.*VPPMESH_UNTESTED_VPP"):
                VppClient(instance.api_socket).connect()
            patched.setenv(compat.UNTESTED_ENV, "1")
            VppClient(instance.api_socket).connect().close()
    finally:
        destroy(prefix, base, quiet=True)

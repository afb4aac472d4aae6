"""`vppmesh down` with a live agent, and `vppmesh uninstall`, against real VPPs.

Two testbed nodes (prefix vun-), one pod each, each running `vppmesh up --watch` (as a
unit would, by hand here: the testbed has no systemd). On n1: `down` refuses while the
agent answers on its control socket and changes nothing; `down --stop-agent` stops the
agent (its loop ends, the process exits 0) and leaves VPP without any vppmesh object, for
good (the agent's poll passes and nothing comes back). On n2, with its agent running:
`uninstall --purge` stops the agent and leaves nothing of vppmesh in VPP, in the node's
Linux links or in its state directory; run again, it says there is nothing left. Skipped
with the reason when VPP or root is missing. Run alone:
    VPPMESH_VPP=/opt/vpp/bin/vpp .venv/bin/python -m pytest -s tests/test_uninstall_vpp.py
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from vppmesh.dataplane.plan import HOST_LINUX_IFNAME, HOST_VETH_PEER
from vppmesh.dataplane.state import is_owned_sa_id, is_owned_tunnel_instance
from vppmesh.dataplane.vpp import interfaces, ipip, ipsec, routes
from vppmesh.dataplane.vpp.client import VppClient
from vppmesh.lab.testbed import NodeHandle, Testbed, in_ns
from vppmesh.testing import vpp_helpers
from vppmesh.testing.wait import wait_for

pytestmark = [pytest.mark.vpp]
PREFIX = "vun-"
BASE = Path("/run/vppmesh-vun")
POLL = 2.0  # the agent's poll (watch.WATCH_POLL_SECONDS): what it would put back, it has

bed = vpp_helpers.bed_fixture(nodes=2, tunnels=2, pods=1, workers=0, prefix=PREFIX,
                              base_dir=BASE)


@pytest.fixture(scope="module")
def agents(bed: Testbed) -> Iterator[dict[str, vpp_helpers.WatchAgent]]:
    running = {n.name: vpp_helpers.WatchAgent(bed, n) for n in bed.nodes}
    with vpp_helpers.running_agents(running):
        for node in bed.nodes:
            wait_for(lambda node=node: control_socket(node).is_socket(), 30,
                     f"{node.name}'s agent control socket")
        yield running


def control_socket(node: NodeHandle) -> Path:
    return node.instance.api_socket.parent / "vppmesh-control.sock"


def vppmesh_in_vpp(bed: Testbed, node: NodeHandle) -> dict[str, int]:
    """Every kind of object vppmesh makes in VPP, counted (all 0: nothing of it left)."""
    with VppClient(node.instance.api_socket).connect() as api:
        return {
            "tunnels": sum(1 for t in ipip.dump_tunnels(api)
                           if is_owned_tunnel_instance(t.instance)),
            "sas": sum(1 for s in ipsec.dump_sas(api) if is_owned_sa_id(s.spec.sa_id)),
            "protections": len(ipsec.dump_protections(api)),
            "interfaces": sum(1 for i in interfaces.dump_interfaces(api)
                              if i.tag.startswith("vppmesh")),
            "mesh table": int(bed.spec.mesh_table_id in routes.dump_tables(api)),
        }


def host_links(node: NodeHandle) -> list[str]:
    """vppmesh's Linux links in the node's namespace."""
    return [name for name in (HOST_LINUX_IFNAME, HOST_VETH_PEER)
            if in_ns(node.netns, "ip", "link", "show", name, check=False).returncode == 0]


def cli(bed: Testbed, node: NodeHandle, command: str, *extra: str
        ) -> subprocess.CompletedProcess[str]:
    return bed.run_vppmesh(node, command, "--state-dir", str(node.dir), *extra, check=False)


def test_down_refuses_then_stops_the_agent_and_leaves_vpp_empty(
        bed: Testbed, agents: dict[str, vpp_helpers.WatchAgent]) -> None:
    n1, n2 = bed.nodes
    agent = agents[n1.name]
    assert agent.proc is not None
    wait_for(lambda: vpp_helpers.pod_ping(n1, n2, count=1).returncode == 0, 30,
             "pod-to-pod ping")
    before = vppmesh_in_vpp(bed, n1)
    assert before["tunnels"] == 2 and before["sas"] > 0

    refused = cli(bed, n1, "down")
    assert refused.returncode == 4, refused.stdout + refused.stderr
    assert f"pid {agent.proc.pid}" in refused.stderr
    assert "systemctl stop vppmesh.service" in refused.stderr
    assert "vppmesh down --stop-agent" in refused.stderr
    assert vppmesh_in_vpp(bed, n1) == before and agent.proc.poll() is None
    assert vpp_helpers.pod_ping(n1, n2, count=2).returncode == 0  # nothing was touched

    started = time.monotonic()
    stopped = cli(bed, n1, "down", "--stop-agent")
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert f"stopped the agent (pid {agent.proc.pid}) over its control socket" \
        in stopped.stdout
    assert agent.proc.wait(timeout=10) == 0  # its loop ended, as on SIGTERM
    print(f"down --stop-agent: {time.monotonic() - started:.2f} s")
    assert "stop requested on the control socket" in agent.text()
    assert not control_socket(n1).exists()
    time.sleep(2 * POLL)  # a poll of a live agent would have put it all back
    assert vppmesh_in_vpp(bed, n1) == dict.fromkeys(before, 0)
    assert host_links(n1) == []
    assert vpp_helpers.pod_ping(n1, n2, count=1).returncode != 0


def test_uninstall_purge_with_the_agent_running_leaves_nothing(
        bed: Testbed, agents: dict[str, vpp_helpers.WatchAgent], tmp_path: Path) -> None:
    n2 = bed.nodes[1]
    agent = agents[n2.name]
    assert agent.proc is not None and agent.proc.poll() is None
    wait_for(lambda: vppmesh_in_vpp(bed, n2)["tunnels"] == 2, 30, "n2's mesh in its VPP")
    assert host_links(n2)
    node_files = sorted(p.name for p in n2.dir.glob(f"{n2.name}.*"))
    assert f"{n2.name}.used-keys.json" in node_files
    # --purge removes the mesh file: give it this node's copy (the testbed's is shared).
    mesh = tmp_path / "mesh.yaml"
    shutil.copy(bed.mesh_file, mesh)
    args = ("--mesh", str(mesh), "--purge", "--key", str(n2.key_file), "--unit-file",
            str(tmp_path / "vppmesh.service"), "--startup-conf", str(tmp_path / "none.conf"))

    started = time.monotonic()
    done = bed.run_vppmesh(n2, "uninstall", "--state-dir", str(n2.dir), *args,
                           check=False)
    print(f"uninstall --purge: {time.monotonic() - started:.2f} s\n{done.stdout}")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "over its control socket" in done.stdout
    assert agent.proc.wait(timeout=10) == 0
    time.sleep(2 * POLL)
    assert vppmesh_in_vpp(bed, n2) == {"tunnels": 0, "sas": 0, "protections": 0,
                                       "interfaces": 0, "mesh table": 0}
    assert host_links(n2) == []
    assert not list(n2.dir.glob(f"{n2.name}.*")) and not list(n2.dir.glob("uplink-*.json"))
    assert not n2.key_file.exists()

    again = bed.run_vppmesh(n2, "uninstall", "--state-dir", str(n2.dir), *args,
                            check=False)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "nothing of vppmesh left to remove on this host" in again.stdout
    assert not [line for line in again.stdout.splitlines() if line.startswith("- ")]

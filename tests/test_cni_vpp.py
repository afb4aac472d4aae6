"""vppmesh-cni end to end: driven exactly as a container runtime drives it, against real VPPs.

A 2-node testbed (prefix vmk-) runs `vppmesh up` on both nodes; the plugin then runs in
node n1's namespace (the "host" of the runtime) with CNI_* variables and the network
configuration on stdin, using Debian's host-local for IPAM. Skipped with the reason when
VPP, root or host-local is missing.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from vppmesh.dataplane.state import GATEWAY_TAG
from vppmesh.dataplane.vpp import interfaces, routes
from vppmesh.dataplane.vpp.client import VppClient
from vppmesh.lab.demo import outbound_packets
from vppmesh.lab.testbed import Testbed, in_ns
from vppmesh.testing import vpp_helpers

pytestmark = [pytest.mark.vpp]
PREFIX = "vmk-"
BASE = Path("/run/vppmesh-vmk")
POD_NS = f"{PREFIX}c1"
OTHER_NS = f"{PREFIX}c2"
CONTAINER = "f00dcafe0123456789abcdef"


@pytest.fixture(scope="module")
def bed() -> Iterator[Testbed]:
    # Leaving the block kills and removes every vmk- namespace, the pods' too.
    with vpp_helpers.testbed(vpp_helpers.require_host_local, prefix=PREFIX, base_dir=BASE,
                             nodes=2, tunnels=2, pods=1) as bed:
        vpp_helpers.add_namespaces(POD_NS, OTHER_NS)
        yield bed


def netconf(bed: Testbed, **override: Any) -> dict[str, Any]:
    node = bed.nodes[0]
    conf: dict[str, Any] = {
        "cniVersion": "1.0.0", "name": "vppmesh", "type": "vppmesh-cni",
        "apiSocket": str(node.instance.api_socket), "mesh": str(bed.mesh_file),
        "node": node.name, "stateDir": str(BASE / "cni-state"),
        "logFile": str(BASE / "cni.log"),
        "ipam": {"type": "host-local", "dataDir": str(BASE / "ipam")},
    }
    conf.update(override)
    return conf


def cni(bed: Testbed, command: str, conf: dict[str, Any] | str, *, netns: str | None = POD_NS,
        container: str = CONTAINER) -> tuple[int, Any]:
    """Run the plugin in node n1's namespace as a runtime would; (exit code, JSON out)."""
    done = vpp_helpers.run_cni(bed.nodes[0].netns, command, conf, container=container,
                               netns=netns, pod="web-0")
    out = json.loads(done.stdout) if done.stdout.strip() else None
    return done.returncode, out


def pod_state(bed: Testbed, address: str) -> dict[str, Any]:
    """What n1's VPP and Linux hold of a CNI pod."""
    with VppClient(bed.nodes[0].instance.api_socket).connect() as api:
        pods = [i for i in interfaces.dump_interfaces(api) if i.tag.startswith("vppmesh:pod:cni-")]
        table = routes.dump_routes(api, 1717) if 1717 in routes.dump_tables(api) else {}
    links = in_ns(bed.nodes[0].netns, "ip", "-o", "link", "show").stdout
    return {"vpp": pods, "route": any(str(p) == f"{address}/32" for p in table),
            "veth": "vpmc" in links}


def ping(ns: str, target: str) -> subprocess.CompletedProcess[str]:
    return in_ns(ns, "ping", "-c", "2", "-W", "2", target, check=False)


@pytest.fixture(scope="module")
def added(bed: Testbed) -> dict[str, Any]:
    code, result = cni(bed, "ADD", netconf(bed))
    assert code == 0, result
    return result


def test_add_result_follows_the_spec(added: dict[str, Any]) -> None:
    assert added["cniVersion"] == "1.0.0"
    pod_if = added["interfaces"][0]
    assert pod_if == {"name": "eth0", "mac": pod_if["mac"],
                      "sandbox": f"/var/run/netns/{POD_NS}"}
    (ip,) = added["ips"]
    assert ip["address"].startswith("198.18.1.") and ip["address"].endswith("/32")
    assert ip["address"] != "198.18.1.1/32"  # the node's own mesh address is skipped
    assert ip["gateway"] == "169.254.0.1" and ip["interface"] == 0
    assert added["routes"] == [{"dst": "0.0.0.0/0", "gw": "169.254.0.1"}]


def test_pod_reaches_the_other_node_through_the_encrypted_mesh(
        bed: Testbed, added: dict[str, Any]) -> None:
    src, dst = bed.nodes
    before = sum(outbound_packets(src, dst.index).values())
    result = ping(POD_NS, str(dst.pod_address(0)))
    assert result.returncode == 0, result.stdout
    assert sum(outbound_packets(src, dst.index).values()) - before >= 2
    back = ping(dst.pod_netns(0), added["ips"][0]["address"].split("/")[0])
    assert back.returncode == 0, back.stdout
    # The node's own host reaches the pod too (a kubelet's probes), through VPP.
    probe = ping(src.netns, added["ips"][0]["address"].split("/")[0])
    assert probe.returncode == 0, probe.stdout
    # Pod side: /32, mesh MTU (1500 underlay - ESP/IPIP overhead), default via VPP.
    link = json.loads(in_ns(POD_NS, "ip", "-j", "-4", "addr", "show", "eth0").stdout)[0]
    assert link["mtu"] == 1440
    assert [(a["local"], a["prefixlen"]) for a in link["addr_info"]] == \
        [(added["ips"][0]["address"].split("/")[0], 32)]
    route = in_ns(POD_NS, "ip", "route", "show", "default").stdout
    assert "via 169.254.0.1" in route and "eth0" in route


def test_the_fallback_is_logged(bed: Testbed, added: dict[str, Any]) -> None:
    if Path("/dev/vhost-net").exists():
        pytest.skip("this host has /dev/vhost-net: pods get a tap v2")
    assert added["interfaces"][1]["name"].startswith("vpmc")
    assert "instead of a tap v2" in (BASE / "cni.log").read_text()


def test_check_passes_and_sees_breakage(bed: Testbed, added: dict[str, Any]) -> None:
    conf = netconf(bed, prevResult=added)
    assert cni(bed, "CHECK", conf) == (0, None)
    in_ns(POD_NS, "ip", "route", "del", "default")
    code, error = cni(bed, "CHECK", conf)
    assert code == 1 and error["code"] == 1003
    assert "route 0.0.0.0/0" in error["details"]
    # ADD again repairs it without a new address.
    code, again = cni(bed, "ADD", netconf(bed))
    assert code == 0, again
    assert again["ips"] == added["ips"]
    assert cni(bed, "CHECK", conf) == (0, None)


def test_pod_survives_vppmesh_up_rerun(bed: Testbed, added: dict[str, Any]) -> None:
    node = bed.nodes[0]
    rerun = bed.run_vppmesh(node, "up", *bed.up_args(node))
    assert rerun.returncode == 0
    assert cni(bed, "CHECK", netconf(bed, prevResult=added)) == (0, None)
    assert ping(POD_NS, str(bed.nodes[1].pod_address(0))).returncode == 0


def test_malformed_config_gets_spec_errors(bed: Testbed) -> None:
    code, error = cni(bed, "ADD", "{not json", container="bad1")
    assert code == 1 and error["code"] == 6
    code, error = cni(bed, "ADD", netconf(bed, mtu="big"), container="bad1")
    assert code == 1 and error["code"] == 7 and "mtu" in error["msg"]
    code, error = cni(bed, "ADD", netconf(bed, apisocket="/x"), container="bad1")
    assert code == 1 and error["code"] == 2 and "apisocket" in error["msg"]
    code, error = cni(bed, "ADD", netconf(bed, cniVersion="0.1.0"), container="bad1")
    assert code == 1 and error["code"] == 1
    code, error = cni(bed, "ADD", netconf(bed), container="bad/1")
    assert code == 1 and error["code"] == 4 and "CNI_CONTAINERID" in error["msg"]
    code, error = cni(bed, "ADD", netconf(bed, node="nope"), container="bad1")
    assert code == 1 and error["code"] == 7 and "'nope'" in error["msg"]
    # None of these attached anything or kept an address.
    assert len(pod_state(bed, "0.0.0.0")["vpp"]) == 1
    assert len(list((BASE / "ipam" / "vppmesh").glob("198.18.*"))) == 1


def test_del_removes_everything_and_is_idempotent(bed: Testbed,
                                                  added: dict[str, Any]) -> None:
    address = added["ips"][0]["address"].split("/")[0]
    assert pod_state(bed, address)["route"]
    # The record holds all DEL needs: it works even when the mesh file is gone.
    assert cni(bed, "DEL", netconf(bed, mesh="/nonexistent/mesh.yaml", prevResult=added)) \
        == (0, None)
    state = pod_state(bed, address)
    assert state == {"vpp": [], "route": False, "veth": False}
    assert "eth0" not in in_ns(POD_NS, "ip", "-o", "link", "show").stdout
    assert not (BASE / "ipam" / "vppmesh" / address).exists()  # address released
    assert cni(bed, "DEL", netconf(bed), netns=None) == (0, None)
    assert cni(bed, "DEL", netconf(bed), container="never-added") == (0, None)
    code, error = cni(bed, "CHECK", netconf(bed))
    assert code == 1 and error["code"] == 1003


def test_gc_removes_attachments_the_runtime_no_longer_knows(bed: Testbed) -> None:
    code, first = cni(bed, "ADD", netconf(bed, cniVersion="1.1.0"), netns=OTHER_NS,
                      container="gc-me")
    assert code == 0, first
    assert first["interfaces"][0]["mtu"] == 1440  # 1.1 results carry the MTU
    conf = netconf(bed, cniVersion="1.1.0")
    conf["cni.dev/valid-attachments"] = [{"containerID": "gc-me", "ifname": "eth0"}]
    assert cni(bed, "GC", conf, netns=None) == (0, None)
    assert len(pod_state(bed, "0.0.0.0")["vpp"]) == 1  # still valid: kept
    conf["cni.dev/valid-attachments"] = []
    assert cni(bed, "GC", conf, netns=None) == (0, None)
    assert pod_state(bed, first["ips"][0]["address"].split("/")[0]) == \
        {"vpp": [], "route": False, "veth": False}
    assert cni(bed, "STATUS", conf, netns=None) == (0, None)


def test_down_removes_pods_and_add_waits_for_the_mesh(bed: Testbed) -> None:
    node = bed.nodes[0]
    code, result = cni(bed, "ADD", netconf(bed))
    assert code == 0, result
    assert bed.run_vppmesh(node, "down").returncode == 0
    # `down` takes the pods out of VPP with the mesh; CHECK says so, DEL still works.
    code, error = cni(bed, "CHECK", netconf(bed, prevResult=result))
    assert code == 1 and error["code"] == 1003
    assert cni(bed, "DEL", netconf(bed)) == (0, None)
    assert pod_state(bed, "0.0.0.0") == {"vpp": [], "route": False, "veth": False}
    # No mesh on the node: ADD asks the runtime to try again and leaves nothing behind.
    code, error = cni(bed, "ADD", netconf(bed))
    assert code == 1 and error["code"] == 11, error
    assert pod_state(bed, "0.0.0.0") == {"vpp": [], "route": False, "veth": False}
    assert not list((BASE / "ipam" / "vppmesh").glob("198.18.*"))
    assert not list((BASE / "cni-state").glob("*.json"))
    code, error = cni(bed, "STATUS", netconf(bed), netns=None)
    assert code == 1 and error["code"] == 50
    with VppClient(node.instance.api_socket).connect() as api:
        assert not [i for i in interfaces.dump_interfaces(api) if i.tag == GATEWAY_TAG]


"""vppmesh-cni without VPP: netconf validation, spec errors and results, IPAM delegation,
attachment records, and the endpoint checks against the fake VPP."""

from __future__ import annotations

import ipaddress
import json
import stat
from pathlib import Path
from typing import Any

import pytest

from vppmesh.cni import run
from vppmesh.cni.commands import Plugin, pod_names
from vppmesh.cni.ipam import effective_ipam, run_ipam
from vppmesh.cni.models import (
    Attachment,
    CniEnv,
    CniError,
    NetConf,
    Result,
    ResultIp,
    ResultRoute,
    parse_netconf,
)
from vppmesh.cni.store import AttachmentStore
from vppmesh.config import dump_mesh
from vppmesh.dataplane.plan import HostOptions, plan
from vppmesh.dataplane.reconcile import reconcile
from vppmesh.dataplane.view import build_view
from vppmesh.host import endpoints
from vppmesh.testing.cni import fake_ipam
from vppmesh.testing.fake_vpp import FakeVpp
from vppmesh.testing.meshes import make_mesh

ENV = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "abc123", "CNI_NETNS": "/proc/self/ns/net",
       "CNI_IFNAME": "eth0", "CNI_PATH": "/nonexistent"}


def conf(**fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"cniVersion": "1.0.0", "name": "vppmesh", "type": "vppmesh-cni",
                            "meshTable": 1717, "mtu": 1440,
                            "ipam": {"type": "host-local",
                                     "ranges": [[{"subnet": "198.18.1.0/24"}]]}}
    base.update(fields)
    return base


def call(command: str, body: dict[str, Any] | str, **env: str) -> tuple[int, Any]:
    raw = body if isinstance(body, str) else json.dumps(body)
    return run({**ENV, "CNI_COMMAND": command, **env}, raw.encode())


# ---- network configuration ------------------------------------------------------------
def test_valid_config_with_explicit_vrf() -> None:
    parsed = parse_netconf(json.dumps(conf()).encode())
    assert parsed.mesh_table == 1717 and parsed.mtu == 1440
    assert parsed.api_socket == Path("/run/vpp/api.sock")
    assert parsed.attachment == "auto"


@pytest.mark.parametrize(("fields", "names"), [
    ({"mtu": "big"}, "mtu"),
    ({"mtu": 100}, "mtu"),
    ({"meshTable": 0}, "meshTable"),
    ({"attachment": "vhost"}, "attachment"),
    ({"queues": 0}, "queues"),
    ({"name": ""}, "name"),
    ({"mesh": "/etc/vppmesh/mesh.yaml"}, "`mesh`"),  # both mesh and meshTable
    ({"ipam": {"type": "host local"}}, "ipam.type"),
])
def test_invalid_fields_give_code_7_naming_the_field(fields: dict[str, Any], names: str) -> None:
    code, out = call("ADD", conf(**fields))
    assert code == 1
    assert out["code"] == 7
    assert names in out["msg"]
    assert out["cniVersion"] == "1.0.0"


def test_missing_mesh_names_both_ways() -> None:
    body = conf()
    del body["meshTable"]
    code, out = call("ADD", body)
    assert (code, out["code"]) == (1, 7)
    assert "`mesh`" in out["msg"] and "`meshTable`" in out["msg"]


def test_unknown_field_is_code_2_with_key_and_value() -> None:
    code, out = call("ADD", conf(apisocket="/run/vpp/api.sock"))
    assert (code, out["code"]) == (1, 2)
    assert "apisocket='/run/vpp/api.sock'" in out["msg"]


def test_runtime_keys_are_accepted() -> None:
    parsed = parse_netconf(json.dumps(conf(
        runtimeConfig={"portMappings": []}, capabilities={"portMappings": True},
        prevResult={"cniVersion": "1.0.0", "ips": []}, args={"cni": {}},
        **{"cni.dev/valid-attachments": []})).encode())
    assert parsed.prev_result == {"cniVersion": "1.0.0", "ips": []}


@pytest.mark.parametrize("raw", ["{", "[1]", "", "\xff"])
def test_undecodable_config_is_code_6(raw: str) -> None:
    code, out = call("ADD", raw)
    assert (code, out["code"]) == (1, 6)


def test_unsupported_version_is_code_1() -> None:
    code, out = call("ADD", conf(cniVersion="0.3.1"))
    assert (code, out["code"]) == (1, 1)
    assert "0.3.1" in out["msg"] and "1.0.0" in out["details"]


@pytest.mark.parametrize(("env", "names"), [
    ({"CNI_COMMAND": "PUT"}, "CNI_COMMAND"),
    ({"CNI_CONTAINERID": ""}, "CNI_CONTAINERID"),
    ({"CNI_CONTAINERID": "-starts-with-dash"}, "CNI_CONTAINERID"),
    ({"CNI_IFNAME": "a-very-long-ifname0"}, "CNI_IFNAME"),
    ({"CNI_IFNAME": "eth/0"}, "CNI_IFNAME"),
    ({"CNI_NETNS": ""}, "CNI_NETNS"),
    ({"CNI_NETNS": "/var/run/netns/does-not-exist"}, "CNI_NETNS"),
    ({"CNI_PATH": ""}, "CNI_PATH"),
])
def test_bad_environment_is_code_4(env: dict[str, str], names: str) -> None:
    code, out = run({**ENV, **env}, json.dumps(conf()).encode())
    assert (code, out["code"]) == (1, 4)
    assert names in out["msg"]


def test_del_needs_no_netns() -> None:
    env = CniEnv.from_environ({**ENV, "CNI_COMMAND": "DEL", "CNI_NETNS": ""})
    assert env.command == "DEL"


def test_version_reply() -> None:
    code, out = run({"CNI_COMMAND": "VERSION"}, b'{"cniVersion": "0.4.0"}')
    assert code == 0
    assert out == {"cniVersion": "0.4.0", "supportedVersions": ["0.4.0", "1.0.0", "1.1.0"]}
    assert run({"CNI_COMMAND": "VERSION"}, b"")[1]["cniVersion"] == "1.1.0"


def test_unreachable_vpp_asks_to_try_again(tmp_path: Path) -> None:
    body = conf(apiSocket=str(tmp_path / "no.sock"), stateDir=str(tmp_path / "state"))
    code, out = call("ADD", body)
    assert (code, out["code"]) == (1, 11)
    assert "no.sock" in out["msg"]
    assert not list((tmp_path / "state").glob("*.json"))


def test_mesh_file_gives_vrf_mtu_and_pod_cidr(tmp_path: Path) -> None:
    from vppmesh.cni.commands import mesh_view

    mesh, _ = make_mesh(2)
    path = tmp_path / "mesh.yaml"
    path.write_text(dump_mesh(mesh))
    body = conf(mesh=str(path), node="node2")
    del body["meshTable"], body["mtu"]
    view = mesh_view(parse_netconf(json.dumps(body).encode()))
    assert view.table_id == mesh.settings.mesh_table_id
    assert view.mtu == mesh.pod_mtu()
    assert view.pod_cidr == mesh.node("node2").pod_cidr
    with pytest.raises(CniError) as err:
        mesh_view(parse_netconf(json.dumps({**body, "node": "node9"}).encode()))
    assert err.value.code == 7 and "'node9'" in err.value.msg
    with pytest.raises(CniError) as err:
        mesh_view(parse_netconf(json.dumps({**body, "mtu": 9000}).encode()))
    assert err.value.code == 7 and "mtu" in err.value.msg


# ---- results and errors ---------------------------------------------------------------
def test_error_json_has_the_spec_fields() -> None:
    err = CniError(7, "invalid network configuration: mtu: too small", "use 576 or more")
    assert err.to_json("1.0.0") == {"cniVersion": "1.0.0", "code": 7,
                                    "msg": "invalid network configuration: mtu: too small",
                                    "details": "use 576 or more"}
    assert "details" not in CniError(11, "later").to_json("1.0.0")


def record(**fields: Any) -> Attachment:
    name, vpp_ifname = pod_names("abc123", "eth0")
    base: dict[str, Any] = dict(
        network="vppmesh", container_id="abc123", ifname="eth0", netns="/proc/self/ns/net",
        name=name, address=ipaddress.IPv4Address("198.18.1.7"), kind="af_packet",
        node_number=1, pod_index=7, vpp_ifname=vpp_ifname, mesh_table=1717, mtu=1440)
    base.update(fields)
    return Attachment(**base)


@pytest.mark.parametrize("version", ["0.4.0", "1.0.0", "1.1.0"])
def test_add_result_per_version(version: str) -> None:
    plugin = Plugin(parse_netconf(json.dumps(conf(cniVersion=version)).encode()),
                    CniEnv.from_environ(ENV), ENV)
    out = plugin.result(record()).to_json()
    assert out["cniVersion"] == version
    assert out["ips"][0]["address"] == "198.18.1.7/32"
    assert out["ips"][0]["gateway"] == "169.254.0.1"
    assert ("version" in out["ips"][0]) == (version == "0.4.0")
    assert ("mtu" in out["interfaces"][0]) == (version == "1.1.0")
    assert out["interfaces"][0]["sandbox"] == "/proc/self/ns/net"
    assert out["interfaces"][1]["name"] == record().vpp_ifname  # af_packet: the host end
    assert out["routes"] == [{"dst": "0.0.0.0/0", "gw": "169.254.0.1"}]
    # The result is itself valid input for the next plugin (prevResult).
    Result.model_validate(out)


def test_result_round_trip() -> None:
    result = Result(cniVersion="1.0.0", ips=[ResultIp(address="198.18.1.2/32")],
                    routes=[ResultRoute(dst="0.0.0.0/0", gw="169.254.0.1")])
    assert Result.model_validate_json(json.dumps(result.to_json())) == result


def test_pod_names_fit_linux_and_vpp_limits() -> None:
    name, vpp_ifname = pod_names("f" * 64, "eth0")
    assert len(vpp_ifname) <= 15 and len(f"vppmesh:pod:{name}") < 64
    assert pod_names("f" * 64, "eth1") != (name, vpp_ifname)


# ---- IPAM delegation ------------------------------------------------------------------
def test_ipam_is_run_like_a_plugin(tmp_path: Path) -> None:
    fake_ipam(tmp_path, '{"cniVersion":"1.0.0","ips":[{"address":"198.18.1.2/24"}]}')
    body = {"cniVersion": "1.1.0", "name": "n", "ipam": {"type": "host-local"}}
    result = run_ipam("ADD", body, {**ENV, "CNI_COMMAND": "DEL"}, (Path("/nope"), tmp_path))
    assert result == {"cniVersion": "1.0.0", "ips": [{"address": "198.18.1.2/24"}]}
    sent = json.loads((tmp_path / "stdin.json").read_text())
    assert sent["cniVersion"] == "1.0.0"  # negotiated down to what the delegate speaks
    env = (tmp_path / "env.txt").read_text().splitlines()
    assert "CNI_COMMAND=ADD" in env and "CNI_CONTAINERID=abc123" in env


def test_ipam_error_is_passed_on(tmp_path: Path) -> None:
    fake_ipam(tmp_path, '{"code": 11, "msg": "no IP addresses available"}', exit_code=1)
    with pytest.raises(CniError) as err:
        run_ipam("ADD", {"cniVersion": "1.0.0", "ipam": {"type": "host-local"}}, ENV,
                 (tmp_path,))
    assert err.value.code == 11 and "no IP addresses available" in err.value.msg


def test_missing_ipam_plugin_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(CniError) as err:
        run_ipam("ADD", {"cniVersion": "1.0.0", "ipam": {"type": "host-local"}}, ENV,
                 (tmp_path,))
    assert "not found in CNI_PATH" in err.value.msg and str(tmp_path) in err.value.details


def test_host_local_range_from_the_pod_cidr() -> None:
    cidr = ipaddress.IPv4Network("198.18.3.0/24")
    ipam = effective_ipam({"type": "host-local", "dataDir": "/x"}, cidr)
    assert ipam["ranges"] == [[{"subnet": "198.18.3.0/24", "rangeStart": "198.18.3.2",
                                "rangeEnd": "198.18.3.254"}]]
    assert ipam["dataDir"] == "/x"
    given = {"type": "host-local", "ranges": [[{"subnet": "10.9.0.0/16"}]]}
    assert effective_ipam(given, cidr) == given
    with pytest.raises(CniError):
        effective_ipam({"type": "host-local"}, None)


def test_ipam_address_outside_the_pod_cidr_is_refused(tmp_path: Path) -> None:
    from vppmesh.cni.commands import MeshView

    plugin = Plugin(parse_netconf(json.dumps(conf()).encode()), CniEnv.from_environ(ENV), ENV)
    view = MeshView(1717, 1440, 1, ipaddress.IPv4Network("198.18.1.0/24"),
                    ipaddress.IPv4Address("198.18.1.1"), False)
    for bad in ("198.18.2.5", "198.18.1.1"):
        with pytest.raises(CniError) as err:
            plugin.check_address(ipaddress.IPv4Address(bad), view)
        assert err.value.code == 1002
    plugin.check_address(ipaddress.IPv4Address("198.18.1.2"), view)


# ---- attachment records ---------------------------------------------------------------
def test_store_round_trip_private_and_atomic(tmp_path: Path) -> None:
    store = AttachmentStore(tmp_path / "state")
    with store.locked():
        store.save(record())
    path = store.path("abc123", "eth0")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert store.load("abc123", "eth0") == record()
    assert store.load("abc123", "eth1") is None
    assert store.all() == [record()]
    path.write_text("{broken")
    assert store.load("abc123", "eth0") is None and store.all() == []
    store.remove("abc123", "eth0")
    store.remove("abc123", "eth0")  # idempotent
    assert not list((tmp_path / "state").glob("*.json"))


# ---- the VPP side of a pod, against the fake VPP ---------------------------------------
@pytest.fixture
def meshed_vpp() -> FakeVpp:
    mesh, secrets = make_mesh(2)
    desired = plan(build_view(mesh, "node1", secrets["node1"]), host=HostOptions(kind="none"))
    vpp = FakeVpp.with_uplink(mesh.node("node1").primary)
    reconcile(vpp, desired)
    return vpp


def pod(address: str = "10.64.1.7") -> Any:
    name, vpp_ifname = pod_names("abc123", "eth0")
    return endpoints.pod_spec(name=name, netns="/proc/self/ns/net",
                              address=ipaddress.IPv4Address(address), node_number=1,
                              pod_index=7, vpp_ifname=vpp_ifname)


def gateway(vpp: FakeVpp) -> int:
    return endpoints.find_tagged(vpp, "vppmesh:gateway")["vppmesh:gateway"].sw_if_index


def test_vpp_side_check_and_reattach(meshed_vpp: FakeVpp) -> None:
    vpp, spec = meshed_vpp, pod()
    assert endpoints.vpp_side_problems(vpp, spec, table_id=1717, mtu=1400) == \
        [f"VPP has no interface tagged {spec.tag}"]
    index = endpoints.attach_vpp(vpp, spec, table_id=1717, mtu=1400, gateway=gateway(vpp),
                                 existing=None)
    assert endpoints.vpp_side_problems(vpp, spec, table_id=1717, mtu=1400) == []
    # Attaching again (ADD retried, MTU changed) keeps the interface and its table.
    existing = endpoints.find_tagged(vpp, spec.tag)[spec.tag]
    assert endpoints.attach_vpp(vpp, spec, table_id=1717, mtu=1380, gateway=gateway(vpp),
                                existing=existing) == index
    assert endpoints.vpp_side_problems(vpp, spec, table_id=1717, mtu=1400) == \
        [f"{existing.name} has MTU 1380 in VPP, not 1400"]
    vpp.neighbors[index].clear()
    problems = endpoints.vpp_side_problems(vpp, spec, table_id=1717, mtu=1380)
    assert problems == [f"no static neighbor {spec.address.ip} -> {spec.linux_mac} in VPP"]


def test_lost_record_is_recovered_from_vpp(meshed_vpp: FakeVpp,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from vppmesh.host import link as host

    monkeypatch.setattr(host, "remove_link", lambda name, netns=None: False)
    vpp, spec = meshed_vpp, pod()
    endpoints.attach_vpp(vpp, spec, table_id=1717, mtu=1400, gateway=gateway(vpp),
                         existing=None)
    blank = pod("0.0.0.0")
    recovered = endpoints.recover_spec(vpp, blank)
    assert recovered is not None
    assert recovered.address == spec.address and recovered.linux_mac == spec.linux_mac
    assert endpoints.detach(vpp, recovered, 1717)
    assert vpp.owned_objects()["tagged"] == 1  # only the gateway is left
    assert str(spec.address) not in vpp.routes[1717]
    assert endpoints.recover_spec(vpp, blank) is None
    assert not endpoints.detach(vpp, recovered, 1717)  # a second time: nothing to do


def test_netconf_model_documents_its_fields() -> None:
    fields = {f.alias or name for name, f in NetConf.model_fields.items()}
    for key in ("apiSocket", "mesh", "node", "meshTable", "mtu", "attachment", "stateDir",
                "logFile", "ipam", "dns"):
        assert key in fields


def test_version_and_config_errors_do_not_load_vpp_or_netlink() -> None:
    import subprocess
    import sys

    probe = ("import sys; from vppmesh.cni import run; "
             "run({'CNI_COMMAND': 'VERSION'}, b'{}'); "
             "print(sorted(m for m in ('vpp_papi', 'pyroute2') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          check=True)
    assert done.stdout.strip() == "[]"


def test_up_rerun_keeps_pods_and_down_removes_them() -> None:
    from vppmesh.dataplane.teardown import teardown

    mesh, secrets = make_mesh(2)
    desired = plan(build_view(mesh, "node1", secrets["node1"]), host=HostOptions(kind="none"))
    vpp = FakeVpp.with_uplink(mesh.node("node1").primary)
    reconcile(vpp, desired)
    spec = pod()
    endpoints.attach_vpp(vpp, spec, table_id=1717, mtu=desired.mtu, gateway=gateway(vpp),
                         existing=None)
    before = vpp.counts.copy()
    assert reconcile(vpp, desired) == []  # the pod is not the agent's to change
    sent = vpp.counts - before
    assert all(name.endswith("_dump") for name in sent), sent  # only looked
    assert endpoints.vpp_side_problems(vpp, spec, table_id=1717, mtu=desired.mtu) == []
    removed = teardown(vpp, 1717)
    assert any(spec.tag in line for line in removed)
    assert vpp.owned_objects()["tagged"] == 0

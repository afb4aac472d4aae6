"""Pods after a VPP restart: the agent re-attaches every pod the CNI plugin attached.

A VPP that restarts (a crash, an upgrade, a SIGKILL) comes back empty: the pods' VPP
interfaces, their place in the mesh VRF, the static neighbours and /32 routes are gone.
The pods' own side is not: a veth lives in the kernel, and so do its address, its
neighbour entry for the gateway and its default route. So the agent, once it has
programmed the mesh again, redoes what ADD did in VPP from each pod's CNI record (the
same tag, MACs, VRF, MTU and routes, through the same endpoints.attach_vpp) and only
repairs the pod's namespace where CHECK would find a difference there (a tap that did not
outlive VPP). Calico/VPP does the same from its persisted pod specs on agent start.

A record whose pod namespace no longer exists belongs to a pod that is gone without a
DEL (the runtime died with it): its VPP and host side are removed, its address released
through the IPAM plugin it came from, and the record dropped.

Records are read under the CNI store's lock, so a re-attach never races an ADD or a DEL.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from vppmesh.cni.commands import spec_of
from vppmesh.cni.ipam import run_ipam
from vppmesh.cni.models import Attachment, CniError
from vppmesh.cni.store import AttachmentStore
from vppmesh.dataplane.state import GATEWAY_TAG
from vppmesh.dataplane.vpp.client import VppApi
from vppmesh.errors import VppMeshError, VppUnavailableError
from vppmesh.host import endpoints
from vppmesh.host import link as linux

log = logging.getLogger("vppmesh.pods")
DEFAULT_CNI_STATE = Path("/var/lib/cni/vppmesh")
DEFAULT_CNI_PATH = (Path("/opt/cni/bin"), Path("/usr/lib/cni"))
NETNS_DIR = Path("/run/netns")


@dataclass
class PodReport:
    """What one pass over the CNI records found and did."""

    attached: int = 0  # pods whose VPP side is in place after the pass
    reattached: list[str] = field(default_factory=list)  # VPP side made again
    repaired: list[str] = field(default_factory=list)  # pod namespace fixed as well
    collected: list[str] = field(default_factory=list)  # netns gone: removed
    failed: list[str] = field(default_factory=list)  # left for the next pass


def netns_exists(netns: str) -> bool:
    """A runtime's CNI_NETNS: a path (/var/run/netns/x, /proc/<pid>/ns/net) or a name."""
    path = Path(netns) if "/" in netns else NETNS_DIR / netns
    return path.exists()


def reattach(api: VppApi, state_dir: Path,
             cni_path: tuple[Path, ...] = DEFAULT_CNI_PATH) -> PodReport:
    """Put back every recorded pod that VPP lost; collect records of vanished pods.

    Pods whose tagged interface VPP still holds are left alone (one interface dump for
    all of them), so a pass on a healthy node costs a dump and touches nothing.
    """
    report = PodReport()
    store = AttachmentStore(state_dir)
    if not state_dir.is_dir():
        return report
    with store.locked():
        records = store.all()
        if not records:
            return report
        found = endpoints.find_tagged(api, GATEWAY_TAG,
                                      *(spec_of(r).tag for r in records))
        gateway = found.get(GATEWAY_TAG)
        for record in records:
            spec = spec_of(record)
            label = f"{record.container_id[:12]}/{record.ifname} ({record.address})"
            if not netns_exists(record.netns):
                collect(api, store, record, cni_path)
                report.collected.append(label)
                continue
            if spec.tag in found:
                report.attached += 1
                continue
            if gateway is None:  # no mesh in VPP yet: `up` has not run, nothing to do
                report.failed.append(label)
                continue
            try:
                repaired = attach_one(api, record, gateway.sw_if_index)
            except VppUnavailableError:
                raise
            except (VppMeshError, OSError) as exc:
                log.warning("re-attaching pod %s failed: %s (next pass retries)", label, exc)
                report.failed.append(label)
                continue
            report.attached += 1
            report.reattached.append(label)
            if repaired:
                report.repaired.append(label)
    for label in report.reattached:
        log.info("pod %s re-attached%s", label,
                 " (pod namespace repaired)" if label in report.repaired else "")
    for label in report.collected:
        log.info("pod %s is gone (no network namespace): its attachment was removed", label)
    return report


def attach_one(api: VppApi, record: Attachment, gateway: int) -> bool:
    """The VPP side exactly as ADD made it; the pod side only if it differs.

    Returns whether the pod's namespace had to be repaired.
    """
    spec = spec_of(record)
    if spec.kind == "af_packet":  # the veth outlives VPP; recreated only if it is gone
        linux.ensure_veth(spec.linux_ifname, spec.vpp_ifname, linux_mac=spec.linux_mac,
                          vpp_mac=spec.vpp_mac, mtu=record.mtu, linux_netns=spec.netns)
    endpoints.attach_vpp(api, spec, table_id=record.mesh_table, mtu=record.mtu,
                         gateway=gateway, existing=None)
    if not linux.linux_side_problems(spec, record.mtu, default_route=True):
        return False
    linux.configure_linux_side(spec, record.mtu, default_route=True)
    return True


def collect(api: VppApi, store: AttachmentStore, record: Attachment,
            cni_path: tuple[Path, ...]) -> None:
    """Remove a vanished pod's VPP and host side, release its address, drop its record."""
    spec = spec_of(record)
    try:
        endpoints.detach(api, spec, record.mesh_table)
    except VppUnavailableError:
        raise
    except (VppMeshError, OSError) as exc:
        log.warning("removing vanished pod %s: %s", record.container_id[:12], exc)
    if record.ipam:
        conf = {"cniVersion": "1.0.0", "name": record.network, "ipam": record.ipam}
        environ = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"),
                   "CNI_CONTAINERID": record.container_id, "CNI_IFNAME": record.ifname,
                   "CNI_PATH": ":".join(map(str, cni_path)), "CNI_NETNS": ""}
        try:
            run_ipam("DEL", conf, environ, cni_path)
        except (CniError, OSError) as exc:  # the runtime's own DEL releases it later
            log.warning("releasing %s of vanished pod %s: %s", record.address,
                        record.container_id[:12], exc)
    store.remove(record.container_id, record.ifname)

"""CNI helpers without VPP: a stand-in IPAM plugin, and a fake VPP as `up` left it."""

from __future__ import annotations

import stat
from pathlib import Path

from vppmesh.dataplane.plan import HostOptions, plan
from vppmesh.dataplane.reconcile import reconcile
from vppmesh.dataplane.view import build_view
from vppmesh.testing.fake_vpp import FakeVpp
from vppmesh.testing.meshes import make_mesh


def fake_ipam(tmp_path: Path, body: str, exit_code: int = 0) -> Path:
    """An executable that records its stdin and environment and answers `body`."""
    script = tmp_path / "host-local"
    script.write_text(f"""#!/bin/sh
cat > {tmp_path}/stdin.json
env > {tmp_path}/env.txt
if [ "$CNI_COMMAND" = VERSION ]; then
  echo '{{"cniVersion":"1.0.0","supportedVersions":["0.4.0","1.0.0"]}}'; exit 0
fi
echo '{body}'
exit {exit_code}
""")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return script


def meshed() -> FakeVpp:
    """A VPP that `up` programmed (gateway, VRF): what a restarted VPP looks like once the
    agent's reconcile ran, before the pods are back."""
    mesh, secrets = make_mesh(2)
    vpp = FakeVpp.with_uplink(mesh.node("node1").primary)
    reconcile(vpp, plan(build_view(mesh, "node1", secrets["node1"]), host=HostOptions(kind="none")))
    return vpp

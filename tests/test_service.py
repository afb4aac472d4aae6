"""The agent as a service: the shipped systemd unit, and knowing whether an agent runs."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from vppmesh.agent import presence
from vppmesh.cli import app
from vppmesh.cli.service import render_unit
from vppmesh.errors import VppMeshError
from vppmesh.testing.wait import wait_for


def unit_fields(text: str) -> dict[str, list[str]]:
    fields: dict[str, list[str]] = {}
    for line in text.splitlines():
        if "=" in line and not line.startswith("#"):
            key, _, value = line.partition("=")
            fields.setdefault(key, []).append(value)
    return fields


def test_unit_runs_up_watch_after_vpp_without_dying_with_it(tmp_path: Path) -> None:
    out = tmp_path / "vppmesh.service"
    result = CliRunner().invoke(app, ["install-unit", "--out", str(out), "--", "--node",
                                      "node1", "--take-uplink", "eth0", "--watch"])
    assert result.exit_code == 0, result.output
    fields = unit_fields(out.read_text())
    exec_start = shlex.split(fields["ExecStart"][0])
    # This interpreter's vppmesh (the test runs it as python -m pytest: -m vppmesh).
    assert exec_start[:3] == [sys.executable, "-m", "vppmesh"]
    assert exec_start[3:] == ["up", "--watch", "--node", "node1", "--take-uplink", "eth0"]
    assert "vpp.service" in fields["After"][0].split()
    assert "vpp.service" in fields["Wants"][0].split()
    assert "Requires" not in fields and "BindsTo" not in fields
    assert fields["Restart"] == ["always"]
    assert fields["WantedBy"] == ["multi-user.target"]
    if shutil.which("systemd-analyze"):  # systemd's own reading of the unit
        checked = subprocess.run(["systemd-analyze", "verify", str(out)],
                                 capture_output=True, text=True, check=False)
        assert checked.returncode == 0 and "vppmesh.service" not in checked.stderr, \
            checked.stderr


def test_unit_quotes_and_escapes_for_systemd() -> None:
    text = render_unit(["--node", "a b", "--state-dir", "/var/lib/%i$x"],
                       command=["/opt/vppmesh/bin/vppmesh"])
    line = next(v for k, v in (ln.split("=", 1) for ln in text.splitlines() if "=" in ln
                                and not ln.startswith("#")) if k == "ExecStart")
    assert line == ("/opt/vppmesh/bin/vppmesh up --watch --node 'a b' --state-dir "
                    "'/var/lib/%%i$$x'")


def test_agent_record_lives_as_long_as_the_agent(tmp_path: Path) -> None:
    assert presence.warning(tmp_path, "n1") is not None
    with presence.running(tmp_path, "n1") as path:
        # This process is a python running pytest, not a vppmesh: its id would be a
        # recycled one, so a record must name a vppmesh process to count.
        assert path.exists()
        assert (presence.agent_pid(tmp_path, "n1") is None) == \
            (b"vppmesh" not in Path(f"/proc/{os.getpid()}/cmdline").read_bytes())
    assert not path.exists()
    # A vppmesh-named process counts while it lives, and not after.
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)",
                             "vppmesh", "up", "--watch"])
    try:
        wait_for(lambda: b"vppmesh" in Path(f"/proc/{proc.pid}/cmdline").read_bytes(), 10,
                 "the child's exec")
        path.write_text(f'{{"pid": {proc.pid}, "node": "n1", "started": 0}}')
        assert presence.agent_pid(tmp_path, "n1") == proc.pid
        assert presence.warning(tmp_path, "n1") is None
    finally:
        proc.kill()
        proc.wait()
    assert presence.agent_pid(tmp_path, "n1") is None
    warning = presence.warning(tmp_path, "n1")
    assert warning is not None and "n1" in warning and "install-unit" in warning


def test_install_unit_refuses_options_up_would_refuse(tmp_path: Path) -> None:
    """A typo in the unit's options made a service that failed and restarted every 2 s:
    the options are parsed by `up`'s own parser first, and nothing is written."""
    out = tmp_path / "vppmesh.service"
    for args, said in ((["--nodee", "node1"], "No such option: --nodee"),
                       (["--node", "node1", "--lease-ttl", "soon"], "'--lease-ttl'"),
                       (["--node", "node1", "stray"], "unexpected extra argument"),
                       (["--node", "node1", "--take-uplink"], "'--take-uplink' requires an "
                                                              "argument")):
        result = CliRunner().invoke(app, ["install-unit", "--out", str(out), "--", *args])
        assert result.exit_code == 2, (args, result.output)
        assert said in result.output and "nothing was written" in result.output, \
            result.output
        assert not out.exists()
    fine = CliRunner().invoke(app, ["install-unit", "--out", str(out), "--", "--node",
                                    "node1", "--take-uplink", "eth0", "--uplink-driver",
                                    "af_xdp", "--metrics", ":9477", "--state-dir", "/x y"])
    assert fine.exit_code == 0, fine.output
    assert "--uplink-driver af_xdp" in unit_fields(out.read_text())["ExecStart"][0]


def test_install_unit_can_let_an_untested_vpp_run(tmp_path: Path) -> None:
    """The unit carries VPPMESH_UNTESTED_VPP=1 only when asked, and then the agent's
    version check lets another release through."""
    from vppmesh.dataplane.vpp import compat

    out = tmp_path / "vppmesh.service"
    plain = CliRunner().invoke(app, ["install-unit", "--out", str(out), "--", "--node", "n1"])
    assert plain.exit_code == 0, plain.output
    assert "VPPMESH_UNTESTED_VPP" not in out.read_text()
    opted = CliRunner().invoke(app, ["install-unit", "--allow-untested-vpp", "--out",
                                     str(out), "--", "--node", "n1"])
    assert opted.exit_code == 0, opted.output
    environment = dict(e.split("=", 1) for e in unit_fields(out.read_text())["Environment"])
    assert environment == {"PYTHONUNBUFFERED": "1", "VPPMESH_UNTESTED_VPP": "1"}
    with pytest.raises(VppMeshError):
        compat.check_version("26.10-release", {})
    assert compat.check_version("26.10-release", environment) is not None  # a warning


def test_install_unit_gives_vpp_a_drop_in_that_returns_the_nic_when_it_stops(
        tmp_path: Path) -> None:
    """Whatever stops vpp.service (stop, crash, OOM kill), systemd runs ExecStopPost: the
    drop-in gives back every NIC saved in the agent's state directory."""
    out = tmp_path / "vppmesh.service"
    result = CliRunner().invoke(app, ["install-unit", "--out", str(out), "--", "--node",
                                      "node1", "--take-uplink", "eth0", "--state-dir",
                                      "/srv/vpp mesh"])
    assert result.exit_code == 0, result.output
    drop_in = tmp_path / "vpp.service.d" / "vppmesh-uplink.conf"
    assert str(drop_in) in result.output
    fields = unit_fields(drop_in.read_text())
    assert list(fields) == ["ExecStopPost"]  # nothing else of VPP's unit changes
    (command,) = fields["ExecStopPost"]
    assert command.startswith("-")  # a failure is logged, VPP still restarts
    words = shlex.split(command[1:])
    assert words[:3] == [sys.executable, "-m", "vppmesh"]
    assert words[3:] == ["uplink", "restore", "--all", "--state-dir", "/srv/vpp mesh"]
    # The command it runs exists with these options (parsed by the real CLI).
    from typer.main import get_command

    restore = get_command(app).commands["uplink"].commands["restore"]  # type: ignore[attr-defined]
    restore.make_context("restore", words[5:])
    # Without --state-dir: the agent's default, the same as the unit's agent uses.
    CliRunner().invoke(app, ["install-unit", "--out", str(out), "--", "--node", "node1"],
                       env={"VPPMESH_STATE_DIR": None})
    assert shlex.split(unit_fields(drop_in.read_text())["ExecStopPost"][0][1:])[-1] == \
        "/var/lib/vppmesh"
    printed = CliRunner().invoke(app, ["install-unit", "--out", "-", "--vpp-drop-in", "-",
                                       "--", "--node", "node1"])
    assert printed.output.count("[Service]") == 2 and "ExecStopPost=-" in printed.output
    if shutil.which("systemd-analyze"):
        unit = tmp_path / "vpp.service"
        unit.write_text("[Service]\nExecStart=/bin/true\n")
        checked = subprocess.run(["systemd-analyze", "verify", str(unit)],
                                 capture_output=True, text=True, check=False)
        # It reads vpp.service.d/ beside the unit and names a drop-in it finds fault with.
        assert checked.returncode == 0 and "vppmesh-uplink.conf" not in checked.stderr, \
            checked.stderr


def test_uplink_restore_all_is_every_saved_nic_and_excludes_interface(tmp_path: Path) -> None:
    done = CliRunner().invoke(app, ["uplink", "restore", "--all", "--state-dir",
                                    str(tmp_path), "--api-socket", str(tmp_path / "no.sock")])
    assert done.exit_code == 0 and "restored 0 uplink(s)" in done.output, done.output
    both = CliRunner().invoke(app, ["uplink", "restore", "--all", "--interface", "eth0",
                                    "--state-dir", str(tmp_path)])
    assert both.exit_code == 2 and "--all" in both.output and "--interface" in both.output

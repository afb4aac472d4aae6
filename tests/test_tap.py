"""The tap v2 requests and testbed options, without VPP (the guest tests run them)."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest
from pydantic import ValidationError

from vppmesh.dataplane.vpp import host_interfaces as hi
from vppmesh.dataplane.vpp.interfaces import RX_MODE_ADAPTIVE, RX_MODE_INTERRUPT
from vppmesh.host import endpoints
from vppmesh.lab.testbed import Testbed, TestbedSpec


def test_tap_flags_gso_gro_consistent_qp_and_persistence() -> None:
    plain = hi.create_tap("eth0", "02:00:00:00:00:01", "02:00:00:00:00:02", 1440, 2,
                          "pod", "vppmesh:pod:p").args
    assert plain["tap_flags"] == hi.TAP_FLAG_GSO | hi.TAP_FLAG_GRO_COALESCE | \
        hi.TAP_FLAG_CONSISTENT_QP
    assert plain["num_rx_queues"] == plain["num_tx_queues"] == 2
    assert plain["host_namespace_set"] and plain["host_namespace"] == "pod"
    assert hi.create_tap("eth0", "m", "h", 1440, 1, None, "t", gso=False).args[
        "tap_flags"] == hi.TAP_FLAG_CONSISTENT_QP
    kept = hi.create_tap("eth0", "02:00:00:00:00:01", "02:00:00:00:00:02", 1440, 2,
                         "pod", "t", persist=True, attach=True).args
    assert kept["tap_flags"] & hi.TAP_FLAG_PERSIST and kept["tap_flags"] & hi.TAP_FLAG_ATTACH


def test_pod_taps_persist_and_af_packet_pods_do_not() -> None:
    address = ipaddress.IPv4Address("198.18.1.10")
    tap = endpoints.pod_spec(name="p", netns="ns", address=address, node_number=1,
                             pod_index=0, kind="tap", queues=2, offloads=True)
    assert tap.persist and tap.offloads and tap.queues == 2
    veth = endpoints.pod_spec(name="p", netns="ns", address=address, node_number=1,
                              pod_index=0, offloads=True)
    assert not veth.persist and not veth.offloads


@pytest.mark.parametrize(("kind", "rx_mode"), [("tap", RX_MODE_ADAPTIVE),
                                               ("af_packet", RX_MODE_INTERRUPT)])
def test_endpoint_taps_receive_adaptively_and_af_packet_keeps_its_interrupts(
        monkeypatch: pytest.MonkeyPatch, kind: str, rx_mode: int) -> None:
    """A tap's queues poll unless told otherwise, and one polling queue keeps a VPP thread
    from ever sleeping; af_packet (no adaptive mode in VPP 26.06) waits on interrupts."""
    from vppmesh.host import link as linux
    from vppmesh.testing.cni import meshed

    monkeypatch.setattr(linux, "link_exists", lambda name, netns=None: False)
    vpp = meshed()
    gateway = endpoints.find_tagged(vpp, endpoints.GATEWAY_TAG)[endpoints.GATEWAY_TAG]
    spec = endpoints.pod_spec(name="p", netns="ns", address=ipaddress.IPv4Address(
        "10.64.1.10"), node_number=1, pod_index=0, kind=kind, queues=2, offloads=True)
    index = endpoints.attach_vpp(vpp, spec, table_id=1717, mtu=1440,
                                 gateway=gateway.sw_if_index, existing=None)
    assert vpp.ifaces[index]["rx_mode"] == rx_mode
    assert vpp.counts["sw_interface_set_rx_mode"] == (kind == "tap")


def test_testbed_passes_the_attachment_to_up_and_attach(tmp_path: Path) -> None:
    bed = Testbed(TestbedSpec(nodes=2, attachment="tap", gso=True, base_dir=tmp_path))
    node = bed.nodes[0]
    assert bed.up_args(node)[-2:] == ["--host-link", "tap"]
    assert bed.attach_args(node, 0)[-2:] == ["--attachment", "tap"]
    assert Testbed(TestbedSpec(nodes=2)).up_args(node)[-1] == "af_packet"
    with pytest.raises(ValidationError, match="attachment"):
        TestbedSpec(attachment="veth")  # type: ignore[arg-type]


def test_guest_script_loads_vhost_net_and_reports_the_exit_code(tmp_path: Path) -> None:
    from vppmesh.lab import vm

    script = vm.guest_script(["python", "-m", "pytest", "a b"], cwd=Path("/repo"),
                             env={"VPPMESH_VPP": "/opt/vpp/bin/vpp"},
                             status_file=tmp_path / "rc")
    assert script.startswith("modprobe vhost_net")
    assert "export VPPMESH_VPP=/opt/vpp/bin/vpp" in script
    assert "python -m pytest 'a b'; echo $? > " in script


def test_guest_outcomes_are_read_from_junit(tmp_path: Path) -> None:
    from vppmesh.testing.vm_outcomes import outcomes

    junit = tmp_path / "junit.xml"
    junit.write_text('<testsuites><testsuite><testcase name="a"/>'
                     '<testcase name="b"><failure message="boom">trace</failure></testcase>'
                     '<testcase name="c"><skipped message="no vpp"/></testcase>'
                     '</testsuite></testsuites>')
    assert outcomes(junit) == {"a": ("passed", ""), "b": ("failed", "boom\ntrace"),
                               "c": ("skipped", "no vpp")}


def test_a_guest_stopped_by_its_time_limit_reports_what_it_finished() -> None:
    from vppmesh.testing.vm_outcomes import outcomes_so_far

    log = ("tests/vm_guest_tap.py::test_a PASSED                      [  8%]\n"
           "tests/vm_guest_tap.py::test_b FAILED                      [ 16%]\n"
           "tests/vm_guest_tap.py::test_c SKIPPED (no vhost-net)      [ 25%]\n"
           "tests/vm_guest_tap.py::test_d PASSED                      [ 33%]\n"
           "tests/vm_guest_tap.py::test_d ERROR                       [ 33%]\n"
           "tests/vm_guest_tap.py::test_e \n")  # running when the guest was stopped
    assert outcomes_so_far(log, "timed out") == {
        "test_a": ("passed", ""), "test_b": ("failed", "timed out"),
        "test_c": ("skipped", "timed out"), "test_d": ("failed", "teardown error; timed out")}


def test_a_guest_past_its_time_limit_is_stopped_with_all_below_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """qemu runs below vng (virtme-run): a time-out must stop the whole tree, including a
    process that left vng's process group."""
    import os
    import sys
    import time

    from vppmesh.lab import vm

    pids = tmp_path / "pids"
    tree = (f"import os, subprocess, sys, time\n"
            f"inner = subprocess.Popen([sys.executable, '-c', 'import os, time; "
            f"os.setpgid(0, 0); time.sleep(300)'])\n"
            f"leaf = subprocess.Popen(['sleep', '300'])\n"
            f"open({str(pids)!r}, 'w').write(f'{{inner.pid}} {{leaf.pid}}')\n"
            f"time.sleep(300)\n")
    monkeypatch.setattr(vm, "missing", lambda: None)
    monkeypatch.setattr(vm, "vng_command", lambda *a, **k: [sys.executable, "-c", tree])
    started = time.monotonic()
    with pytest.raises(vm.VmError, match="did not finish within 3 s"):
        vm.run(["true"], vm.GuestSpec(timeout=3, rwdirs=(tmp_path,)), log=tmp_path / "log")
    assert time.monotonic() - started < 30
    below = [int(p) for p in pids.read_text().split()]
    assert len(below) == 2
    for pid in below:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            continue
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        assert state == "Z", f"process {pid} below the guest still runs"


def test_a_terminated_guest_run_stops_the_guest_then_ends_by_the_signal(tmp_path: Path) -> None:
    """SIGTERM to the process running a guest (a cancelled CI job) stops qemu and all
    below it, then ends the process as SIGTERM would: nothing is left running."""
    import os
    import signal
    import subprocess
    import sys
    import time

    pids = tmp_path / "pids"
    tree = (f"import os, subprocess, sys, time\n"
            f"leaf = subprocess.Popen(['sleep', '300'])\n"
            f"open({str(pids)!r}, 'w').write(f'{{os.getpid()}} {{leaf.pid}}')\n"
            f"time.sleep(300)\n")
    runner = (f"import sys\nfrom pathlib import Path\nfrom vppmesh.lab import vm\n"
              f"vm.missing = lambda: None\n"
              f"vm.vng_command = lambda *a, **k: [sys.executable, '-c', {tree!r}]\n"
              f"vm.run(['true'], vm.GuestSpec(timeout=120, rwdirs=(Path({str(tmp_path)!r}),)),"
              f" log=Path({str(tmp_path / 'log')!r}))\n")
    proc = subprocess.Popen([sys.executable, "-c", runner])
    deadline = time.monotonic() + 30
    while not pids.exists() or len(pids.read_text().split()) < 2:
        assert time.monotonic() < deadline, "the fake guest did not start"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == -signal.SIGTERM
    for pid in (int(p) for p in pids.read_text().split()):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            continue
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        assert state == "Z", f"process {pid} of the guest still runs"


@pytest.mark.parametrize(("dev_type", "kind"), [
    ("tap", "tap"),            # VPP 26.06: taps live in the tap plugin
    ("virtio", "tap"),         # VPP before 26.06: taps were virtio devices in vnet
    ("af-packet", "af_packet"),
])
def test_endpoint_kind_from_the_interface_dump(dev_type: str, kind: str) -> None:
    assert hi.attachment_kind(dev_type) == kind


def test_guest_output_is_copied_as_it_grows_and_to_the_last_byte(tmp_path: Path) -> None:
    """`vppmesh vm run` copies the command's output from the shared file while the guest
    runs (a demo takes minutes) and everything written before the end."""
    import io
    import threading
    import time

    from vppmesh.lab import vm

    shared, sink, done = tmp_path / "out", io.BytesIO(), threading.Event()
    copier = threading.Thread(target=vm.follow, args=(shared, sink, done, 0.01))
    copier.start()
    time.sleep(0.05)  # the file does not exist yet: nothing to copy, no error
    with shared.open("ab") as f:
        f.write(b"... VPP on n1\n")
        f.flush()
        deadline = time.monotonic() + 5
        while sink.getvalue() != b"... VPP on n1\n" and time.monotonic() < deadline:
            time.sleep(0.01)
        assert sink.getvalue() == b"... VPP on n1\n"  # copied before the end
        f.write(b"pair  ping\n")
    done.set()
    copier.join(5)
    assert sink.getvalue() == b"... VPP on n1\npair  ping\n"

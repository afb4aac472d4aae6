"""The tap v2 path, checked in a VM guest with /dev/vhost-net (marker `vm`, docs/vm.md).

One guest is booted for the module (virtme-ng, qemu; software emulation unless
VPPMESH_VM_KVM=1) and runs tests/vm_guest_tap.py there,
against the VPP named by VPPMESH_VM_VPP (else VPPMESH_VPP, else `vpp` on PATH); each
guest test is reported here as one test. Skipped with a one-line reason when qemu, a
kernel with vhost_net, virtme-ng or a VPP is missing. Expect about 17 minutes under
emulation on a 2-core machine; `make test` leaves these out, `make vm-test` runs them.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

from vppmesh.lab import vm
from vppmesh.testing.vm_outcomes import outcomes, outcomes_so_far

pytestmark = [pytest.mark.vm]
REPO = Path(__file__).resolve().parent.parent
GUEST_TESTS = [
    "test_host_links_and_pods_are_taps_with_a_queue_pair_per_worker",
    "test_pod_to_pod_ping_and_df_ping_at_the_pod_mtu",
    "test_iperf3_with_gso_has_no_connection_error",
    "test_large_segments_reach_vpp_and_are_segmented_before_esp",
    "test_receiving_pod_sees_no_checksum_errors",
    "test_no_esp_error_counter_grows",
    "test_underlay_carries_only_esp_between_nodes_within_the_mtu",
    "test_both_workers_carry_the_pod_traffic",
    "test_verify_capture_passes",
    "test_cni_add_check_del_with_attachment_tap",
    "test_pod_tap_survives_a_vpp_restart_and_is_attached_again",
    "test_uplink_host_tap_carries_tcp_with_gso",
]


@pytest.fixture(scope="module")
def guest() -> dict[str, tuple[str, str]]:
    reason = vm.missing()
    if reason is not None:
        pytest.skip(reason)
    try:
        vpp = vm.find_guest_vpp()
    except vm.VmError as exc:
        pytest.skip(str(exc))
    # The guest writes its output, junit and measurements straight here, kept for reading
    # afterwards: nothing is left elsewhere when a signal ends the run half-way.
    keep = Path(os.environ.get("VPPMESH_VM_KEEP", "/tmp/vppmesh-vm-last"))
    shutil.rmtree(keep, ignore_errors=True)
    keep.mkdir(parents=True)
    command = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p",
               "no:hypothesispytest", "-v", "-rA",
               "--durations=0", "-o", "console_output_style=times",
               f"--junitxml={keep / 'junit.xml'}", "tests/vm_guest_tap.py"]
    spec = vm.GuestSpec(cpus=4, memory="4G", rwdirs=(keep,), timeout=2800,
                        env={"VPPMESH_VPP": str(vpp), "VPPMESH_VM_RESULTS": str(keep)})
    stopped = None
    try:
        vm.run(command, spec, cwd=REPO, log=keep / "guest.log", output=keep / "pytest.log")
    except vm.VmError as exc:  # a time-out: report what had finished
        stopped = str(exc)
    junit = keep / "junit.xml"
    output = keep / "pytest.log"
    if stopped is not None and output.exists():
        found = outcomes_so_far(output.read_text(errors="replace"), stopped)
        return found | {name: ("failed", f"not reached: {stopped}") for name in GUEST_TESTS
                        if name not in found}
    if not junit.exists():
        pytest.fail(f"the guest wrote no report ({stopped or 'it exited'}); its output is in "
                    f"{keep}:\n"
                    + (keep / "guest.log").read_text()[-1500:]
                    + (output.read_text()[-1500:] if output.exists() else ""))
    return outcomes(junit)


@pytest.mark.parametrize("name", GUEST_TESTS)
def test_in_guest(guest: dict[str, tuple[str, str]], name: str) -> None:
    outcome, text = guest.get(name, ("missing", "the guest did not run it"))
    if outcome == "skipped":
        pytest.skip(text.splitlines()[0] if text else "skipped in the guest")
    assert outcome == "passed", f"{name} in the guest: {outcome}\n{text}"


def test_every_guest_test_is_reported(guest: dict[str, tuple[str, str]]) -> None:
    assert sorted(guest) == sorted(GUEST_TESTS)

"""VPP's startup.conf as render-startup writes it: no core file holds the ESP keys
unless the operator asks for one, and is told what it holds."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner, Result

from vppmesh.cli import app
from vppmesh.config import dump_mesh
from vppmesh.dataplane import startup
from vppmesh.dataplane.startup import (
    Instance,
    MeshSize,
    available_profiles,
    fit_to_mesh,
    load_profile,
    main_heap_bytes,
    render,
    size_bytes,
    statseg_bytes,
)
from vppmesh.testing.meshes import make_mesh


def unix_section(text: str) -> list[str]:
    lines = text.splitlines()
    return [line.strip() for line in lines[lines.index("unix {") + 1:lines.index("}")]]


@pytest.mark.parametrize("name", sorted(available_profiles()))
def test_no_profile_lets_vpp_dump_its_keys_by_default(name: str, tmp_path: Path) -> None:
    """A crash of VPP must not leave its SAs' keys on disk: with full-coredump (hugepage
    profiles had it) a core file holds every live ESP key, and anyone who reads it later
    decrypts what was recorded, forward secrecy or not."""
    unix = unix_section(render(load_profile(name), Instance(runtime_dir=tmp_path)))
    assert "full-coredump" not in unix
    assert "coredump-size 0" in unix  # no core file at all, whatever ulimit says


def test_full_coredump_is_an_opt_in_with_a_warning(tmp_path: Path,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    profile = load_profile("bare-metal-dpdk")
    with caplog.at_level(logging.WARNING):
        unix = unix_section(render(profile, Instance(runtime_dir=tmp_path), coredump=True))
    assert "full-coredump" in unix and "coredump-size 0" not in unix
    assert "core file holds every live ESP key" in caplog.text
    # The profile's own option does the same; --no-coredump overrides it.
    opted = tmp_path / "debug.yaml"
    opted.write_text(yaml.safe_dump({**profile.model_dump(), "full_coredump": True}))
    assert "full-coredump" in unix_section(render(load_profile(str(opted)),
                                                  Instance(runtime_dir=tmp_path)))
    assert "full-coredump" not in unix_section(render(load_profile(str(opted)),
                                                      Instance(runtime_dir=tmp_path),
                                                      coredump=False))


def test_render_startup_coredump_flag_warns(tmp_path: Path) -> None:
    runner = CliRunner()
    plain = runner.invoke(app, ["render-startup", "--profile", "xl710-avf", "--no-host-check"])
    assert plain.exit_code == 0, plain.output
    assert "full-coredump" not in plain.output and "ESP key" not in plain.output
    out = tmp_path / "startup.conf"
    opted = runner.invoke(app, ["render-startup", "--profile", "xl710-avf", "--coredump",
                                "--no-host-check", "--out", str(out)])
    assert opted.exit_code == 0, opted.output
    assert "full-coredump" in unix_section(out.read_text())
    assert "warning: VPP will write full core files: a core file holds every live ESP " \
           "key" in opted.output


# ---- this machine's NIC, cores and hugepages ---------------------------------------------
def meminfo(tmp_path: Path, total: int, free: int, size_kb: int = 2048) -> Path:
    path = tmp_path / "meminfo"
    path.write_text(f"MemTotal:       65536000 kB\nHugePages_Total:    {total}\n"
                    f"HugePages_Free:     {free}\nHugepagesize:       {size_kb} kB\n")
    return path


@pytest.fixture
def machine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A 16-CPU, one-NUMA-node host with 2048 free 2 MiB hugepages (fake /proc, /sys)."""
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    monkeypatch.setattr(startup, "MEMINFO", meminfo(tmp_path, 2048, 2048))
    monkeypatch.setattr(startup, "NODE_SYSFS", tmp_path / "no-numa")
    return tmp_path


def render_cli(*args: str) -> Result:
    return CliRunner().invoke(app, ["render-startup", *args])


def test_pci_and_cores_replace_the_example_machines(machine: Path) -> None:
    """The hardware profiles name an example's PCI address and cores 1-3: --pci and
    --cores give this machine's, with one queue pair per worker."""
    done = render_cli("--profile", "xl710-avf", "--pci", "0000:5E:02.1", "--pci", "5e:02.2",
                      "--cores", "4-7")
    assert done.exit_code == 0, done.output
    assert "  main-core 4" in done.stdout and "  corelist-workers 5,6,7" in done.stdout
    assert "dev pci/0000:5e:02.1 {" in done.stdout and "dev pci/0000:5e:02.2 {" in done.stdout
    assert "port 0 { name uplink0 num-rx-queues 3 num-tx-queues 3 }" in done.stdout
    assert "port 0 { name uplink1 num-rx-queues 3" in done.stdout
    assert "3b:02.0" not in done.stdout
    dpdk = render_cli("--profile", "bare-metal-dpdk", "--pci", "0000:af:00.1", "--main-core",
                      "8", "--workers", "2")
    assert dpdk.exit_code == 0, dpdk.output
    assert "  dev 0000:af:00.1 { num-rx-queues 2 num-tx-queues 2 }" in dpdk.stdout
    assert "  main-core 8" in dpdk.stdout and "  workers 2" in dpdk.stdout


@pytest.mark.parametrize(("args", "said"), [
    (["--pci", "3b:02"], "--pci '3b:02' is not a PCI address"),
    (["--pci", "0000:3b:20.0"], "is not a PCI address: give domain:bus:device.function"),
    (["--cores", "3-1"], "--cores '3-1' is not a CPU list"),
    (["--cores", "12-16"], "core 16 does not exist on this host (it has 16 CPUs, 0-15)"),
    (["--main-core", "2"], "core 2 is the main thread's and a worker's"),
    (["--cores", "1-3", "--workers", "2"], "give --cores or --workers"),
    (["--cores", "1-3", "--main-core", "1"], "give either --cores or --main-core"),
])
def test_bad_pci_addresses_and_cores_are_refused(machine: Path, args: list[str],
                                                 said: str) -> None:
    out = machine / "startup.conf"
    done = render_cli("--profile", "xl710-avf", "--out", str(out), *args)
    assert done.exit_code == 2, done.output
    assert said in done.output
    assert not out.exists()


def test_the_profiles_own_cores_are_checked_against_this_host(
        machine: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    refused = render_cli("--profile", "bare-metal-dpdk")  # main 1, workers on 2-5
    assert refused.exit_code == 2 and "core 4 does not exist on this host" in refused.output
    assert "--cores" in refused.output
    assert render_cli("--profile", "bare-metal-dpdk", "--no-host-check").exit_code == 0
    assert render_cli("--profile", "generic", "--workers", "4").exit_code == 2


def test_hugepages_needed_are_printed_and_a_short_host_is_refused(
        machine: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """xl710-avf needs its 2G heap, 131072 buffers and 128M of statistics in hugepages
    (about 2.4 GiB): more than FD.io's default 1024 x 2 MiB, so VPP would not start."""
    out = machine / "startup.conf"
    done = render_cli("--profile", "xl710-avf", "--cores", "1-3", "--out", str(out))
    assert done.exit_code == 0, done.output
    assert "needs 1236 pages of 2048 kB (2472 MiB: main heap 2G, buffers 131072 x 2368 B " \
           "x 1 NUMA node(s) = 296 MiB, stats segment 128M); this host has 2048 (2048 " \
           "free)" in done.output
    assert "hugepages" not in out.read_text()
    out.unlink()
    monkeypatch.setattr(startup, "MEMINFO", meminfo(machine, 1024, 1024))  # FD.io's default
    short = render_cli("--profile", "xl710-avf", "--cores", "1-3", "--out", str(out))
    assert short.exit_code == 1, short.output
    assert "this host has 1024 hugepages of 2048 kB, the startup.conf needs 1236" \
        in short.output
    assert "sysctl -w vm.nr_hugepages=1236" in short.output
    assert "/etc/sysctl.d/80-vpp.conf" in short.output and not out.exists()
    forced = render_cli("--profile", "xl710-avf", "--cores", "1-3", "--out", str(out),
                        "--no-hugepage-check")
    assert forced.exit_code == 0 and out.exists() and "needs 1236 pages" in forced.output
    # Reserved but held by the running VPP: written, with a warning.
    monkeypatch.setattr(startup, "MEMINFO", meminfo(machine, 2048, 100))
    held = render_cli("--profile", "xl710-avf", "--cores", "1-3", "--out", str(out))
    assert held.exit_code == 0 and "only 100 of them are free now" in held.output
    # 4K-page profiles need none and say nothing about them.
    plain = render_cli("--profile", "generic")
    assert plain.exit_code == 0 and "hugepages" not in plain.output


def test_hugepages_of_1g_pages_and_numa_nodes(tmp_path: Path) -> None:
    sysfs = tmp_path / "hugepages"
    (sysfs / "hugepages-1048576kB").mkdir(parents=True)
    (sysfs / "hugepages-1048576kB" / "nr_hugepages").write_text("4\n")
    (sysfs / "hugepages-1048576kB" / "free_hugepages").write_text("4\n")
    profile = load_profile("bare-metal-dpdk").model_copy(update={"page_size": "1G"})
    pages = startup.hugepages(profile, meminfo=meminfo(tmp_path, 0, 0), sysfs=sysfs, numa=2)
    assert pages is not None
    # Heap 2 pages, buffers 2 x 131072 x 2496 B (624 MiB) 1 page, statistics 1 page.
    assert (pages.page_kb, pages.needed, pages.total) == (1 << 20, 4, 4) and pages.enough
    assert "hugepagesz=1G hugepages=4" in pages.fix()
    nodes = tmp_path / "node"
    nodes.mkdir()
    (nodes / "has_cpu").write_text("0-1\n")
    assert startup.numa_nodes(nodes) == 2 and startup.numa_nodes(tmp_path / "none") == 1
    assert startup.hugepages(load_profile("small-node")) is None


# ---- sized to the mesh -------------------------------------------------------------------
def memory_lines(text: str) -> tuple[str, str]:
    lines = text.splitlines()
    return (next(line for line in lines if line.startswith("memory {")),
            next(line for line in lines if line.startswith("statseg {")))


def test_the_stats_segment_grows_with_the_mesh() -> None:
    """At 5000 peers x 4 tunnels VPP stopped answering with the profiles' 64M stats
    segment, and had 81 MiB of it in use after the first reconcile: the size for that mesh
    is above both; per tunnel, per worker and per peer it only grows."""
    assert statseg_bytes(MeshSize(5000, 4)) > 81 << 20
    assert statseg_bytes(MeshSize(5000, 4)) > size_bytes(load_profile("testbed").statseg_size)
    assert statseg_bytes(MeshSize(1000, 4)) >= 16 << 20  # in use at 1000 x 4
    assert statseg_bytes(MeshSize(0, 1)) == startup.STATSEG_BASE
    assert statseg_bytes(MeshSize(5000, 4), workers=4) > statseg_bytes(MeshSize(5000, 4))
    assert statseg_bytes(MeshSize(5000, 2)) < statseg_bytes(MeshSize(5000, 4)) \
        < statseg_bytes(MeshSize(10000, 4))
    # The main heap: 54 KiB per peer measured at 4 tunnels (292 MiB in use at 5000).
    assert main_heap_bytes(MeshSize(5000, 4)) > 292 << 20
    assert main_heap_bytes(MeshSize(5000, 4)) > size_bytes(load_profile("small-node")
                                                           .main_heap_size)


def test_a_profile_is_raised_for_a_large_mesh_and_never_lowered(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    small = load_profile("small-node")
    with caplog.at_level(logging.WARNING):
        fitted = fit_to_mesh(small, MeshSize(5000, 4))
    assert size_bytes(fitted.statseg_size) == statseg_bytes(MeshSize(5000, 4))
    assert size_bytes(fitted.main_heap_size) == main_heap_bytes(MeshSize(5000, 4))
    assert "statseg_size 32M is too small for 5000 peers x 4 tunnels: raised to " \
        f"{fitted.statseg_size}" in caplog.text
    assert "main_heap_size 512M is too small" in caplog.text
    memory, statseg = memory_lines(render(fitted, Instance(runtime_dir=tmp_path)))
    assert f"main-heap-size {fitted.main_heap_size} " in memory
    assert f" size {fitted.statseg_size} " in statseg
    # A profile's sizes are a floor: a small mesh keeps them, and says nothing.
    caplog.clear()
    big = load_profile("xl710-avf")
    with caplog.at_level(logging.WARNING):
        assert fit_to_mesh(big, MeshSize(10, 4)) == big
    assert "too small" not in caplog.text


def test_render_startup_sizes_vpp_for_peers_or_the_mesh_file(machine: Path) -> None:
    plain = render_cli("--profile", "small-node")
    assert memory_lines(plain.stdout)[1].endswith("size 32M page-size 4k per-node-counters on }")
    sized = render_cli("--profile", "small-node", "--peers", "5000", "--tunnels", "4")
    assert sized.exit_code == 0, sized.output
    expected = fit_to_mesh(load_profile("small-node"), MeshSize(5000, 4))
    memory, statseg = memory_lines(sized.stdout)
    assert f" size {expected.statseg_size} " in statseg
    assert f"main-heap-size {expected.main_heap_size} " in memory
    # The mesh file says both: its nodes but this one, and settings.tunnels_per_peer.
    mesh, _ = make_mesh(3, 2)
    path = machine / "mesh.yaml"
    path.write_text(dump_mesh(mesh))
    from_file = render_cli("--profile", "small-node", "--mesh", str(path), "--workers", "2")
    assert from_file.exit_code == 0, from_file.output
    wanted = fit_to_mesh(load_profile("small-node"), MeshSize(2, 2), workers=2)
    assert memory_lines(from_file.stdout) == memory_lines(render(wanted, Instance(),
                                                                 workers=2))


def test_the_raised_stats_segment_counts_in_the_hugepage_check(machine: Path) -> None:
    """A hugepage profile raised for the mesh needs more pages: the host is checked for
    those, not for the profile's."""
    done = render_cli("--profile", "xl710-avf", "--cores", "1-3", "--peers", "5000",
                      "--tunnels", "4")
    assert done.exit_code == 0, done.output
    assert "stats segment 128M" not in done.output
    raised = fit_to_mesh(load_profile("xl710-avf"), MeshSize(5000, 4), workers=2)
    assert f"stats segment {raised.statseg_size})" in done.output
    short = render_cli("--profile", "xl710-avf", "--cores", "1-3", "--peers", "40000",
                       "--tunnels", "4")
    assert short.exit_code == 1 and "this host has 2048 hugepages" in short.output


@pytest.mark.parametrize(("args", "said"), [
    (["--tunnels", "4"], "--tunnels sizes VPP for a mesh of --peers peers: give --peers too"),
    (["--peers", "-1"], "give --peers 0 or more"),
    (["--peers", "10", "--tunnels", "0"], "--tunnels 1 or more"),
    (["--peers", "10", "--mesh", "mesh.yaml"], "give either --mesh or --peers/--tunnels"),
])
def test_bad_mesh_sizes_are_refused(machine: Path, args: list[str], said: str) -> None:
    done = render_cli("--profile", "small-node", *args)
    assert done.exit_code == 2, done.output
    assert said in done.output

"""Render a VPP startup.conf from a profile (vpp-startup/, shipped with the package as
vppmesh/profiles/).

A profile captures what differs between machines (cores, pages, buffers, drivers); the
rendering adds what differs between instances on one machine (runtime directory, API
and CLI sockets, shared-memory prefix), so several VPPs can run side by side.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from vppmesh.errors import ConfigError
from vppmesh.validation import describe

PROFILE_DIR_ENV = "VPPMESH_STARTUP_DIR"
COREDUMP_WARNING = ("VPP will write full core files: a core file holds every live ESP key "
                    "(and the keys of recent generations), readable by whoever can read "
                    "the core files; enable this only to debug a crash, and delete the "
                    "core files after")

log = logging.getLogger(__name__)


class Device(BaseModel):
    """A NIC for VPP's native device layer (iavf, ...)."""

    model_config = ConfigDict(extra="forbid")
    id: str
    driver: str
    port_name: str = "uplink0"
    queues: int = Field(default=1, ge=1, le=64)


class DpdkDevice(BaseModel):
    model_config = ConfigDict(extra="forbid")
    pci: str
    queues: int = Field(default=1, ge=1, le=64)


class Profile(BaseModel):
    """The machine-level knobs of one kind of node."""

    model_config = ConfigDict(extra="forbid")
    description: str = ""
    main_core: int | None = None
    workers: int = Field(default=0, ge=0, le=256)
    corelist_workers: str | None = None
    poll_sleep_usec: int = Field(default=0, ge=0)
    page_size: Literal["4k", "default-hugepage", "2M", "1G"] = "4k"
    main_heap_size: str = "1G"
    buffers_per_numa: int = Field(default=32768, ge=1024)
    statseg_size: str = "64M"
    plugins: list[str] = Field(default_factory=lambda: ["af_packet", "ping"])
    crypto_engines: list[str] = Field(default_factory=lambda: ["native", "openssl"])
    devices: list[Device] = Field(default_factory=list)
    dpdk_devices: list[DpdkDevice] = Field(default_factory=list)
    # Off: VPP writes no core file at all (coredump-size 0). A core file holds the SAs'
    # keys, so it would undo forward secrecy for whoever reads it.
    full_coredump: bool = False


class Instance(BaseModel):
    """Where one VPP instance keeps its sockets and files."""

    model_config = ConfigDict(extra="forbid")
    name: str = "vpp"
    runtime_dir: Path = Path("/run/vpp")

    @property
    def api_socket(self) -> Path:
        return self.runtime_dir / "api.sock"

    @property
    def cli_socket(self) -> Path:
        return self.runtime_dir / "cli.sock"

    @property
    def stats_socket(self) -> Path:
        return self.runtime_dir / "stats.sock"

    @property
    def punt_socket(self) -> Path:
        """VPP's end of the punt socket: what the agent writes here, VPP sends."""
        return self.runtime_dir / "punt.sock"

    @property
    def log_file(self) -> Path:
        return self.runtime_dir / "vpp.log"

    @property
    def pid_file(self) -> Path:
        # VPP refuses a pid file outside its runtime directory.
        return self.runtime_dir / "vpp.pid"


PACKAGE_PROFILES = Path(__file__).resolve().parent.parent / "profiles"
LOCAL_PROFILES = Path("/etc/vppmesh/vpp-startup")


def profile_dirs() -> list[Path]:
    """Where profiles are looked up, first match wins: $VPPMESH_STARTUP_DIR, the host's own
    (/etc/vppmesh/vpp-startup), then those shipped as package data, which every install
    (editable or not) has."""
    dirs = []
    if env := os.environ.get(PROFILE_DIR_ENV):
        dirs.append(Path(env))
    return [*dirs, LOCAL_PROFILES, PACKAGE_PROFILES]


def available_profiles() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for directory in profile_dirs():
        if directory.is_dir():
            for path in sorted(directory.glob("*.yaml")):
                found.setdefault(path.stem, path)
    return found


def load_profile(name_or_path: str) -> Profile:
    path = Path(name_or_path)
    if not path.is_file():
        profiles = available_profiles()
        if name_or_path not in profiles:
            known = ", ".join(sorted(profiles)) or "none found"
            raise ConfigError(f"profile {name_or_path!r} not found (known: {known}); pass a "
                              f"profile name or a path to a profile YAML file")
        path = profiles[name_or_path]
    try:
        return Profile.model_validate(yaml.safe_load(path.read_text()))
    except ValidationError as exc:
        raise ConfigError(f"{path}: {describe(exc)}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None


def _plugin_file(name: str) -> str:
    return name if name.endswith(".so") else f"{name}_plugin.so"


def core_files(enabled: bool) -> list[str]:
    """The unix section's lines for VPP's core files: none by default (they hold every
    live ESP key); with `enabled`, full ones (hugepage memory included, no size limit,
    whatever the agent or systemd set) and a warning."""
    if not enabled:
        return ["  coredump-size 0"]
    log.warning("%s", COREDUMP_WARNING)
    return ["  full-coredump", "  coredump-size unlimited"]


def render(profile: Profile, instance: Instance, *, workers: int | None = None,
           coredump: bool | None = None) -> str:
    """startup.conf text for one VPP instance; `coredump` overrides the profile's
    full_coredump."""
    n_workers = profile.workers if workers is None else workers
    page = profile.page_size
    lines = [
        "unix {",
        "  nodaemon",
        f"  runtime-dir {instance.runtime_dir}",
        f"  cli-listen {instance.cli_socket}",
        f"  log {instance.log_file}",
        f"  pidfile {instance.pid_file}",
        *core_files(profile.full_coredump if coredump is None else coredump),
    ]
    if profile.poll_sleep_usec:
        lines.append(f"  poll-sleep-usec {profile.poll_sleep_usec}")
    lines += [
        "}",
        f"api-segment {{ prefix {instance.name} }}",
        f"socksvr {{ socket-name {instance.api_socket} }}",
        # The agents' channel (vppmesh/channel) sends and receives through it; without
        # it punt_socket_register fails. Unused, it costs one idle unix socket.
        f"punt {{ socket {instance.punt_socket} }}",
        f"memory {{ main-heap-size {profile.main_heap_size} main-heap-page-size {page} }}",
        f"buffers {{ buffers-per-numa {profile.buffers_per_numa} page-size {page} }}",
        f"statseg {{ socket-name {instance.stats_socket} size {profile.statseg_size} "
        f"page-size {page} per-node-counters on }}",
        "cpu {",
    ]
    if profile.main_core is not None:
        lines.append(f"  main-core {profile.main_core}")
    if n_workers and profile.corelist_workers and workers is None:
        lines.append(f"  corelist-workers {profile.corelist_workers}")
    else:
        lines.append(f"  workers {n_workers}")
    lines.append("}")
    lines += ["plugins {", "  plugin default { disable }"]
    lines += [f"  plugin {_plugin_file(p)} {{ enable }}" for p in profile.plugins]
    lines += ["}", "crypto-engines {", "  default { disable }"]
    lines += [f"  {e} {{ enable }}" for e in profile.crypto_engines]
    lines.append("}")
    # The native crypto engine says which AES-GCM code it took only at debug level;
    # `vppmesh status` and `up` read it to pick the fastest engine and to warn.
    # Its debug lines (a few hundred at start) need a larger ring than the default 512
    # entries, and more than the default 50 messages a second.
    lines.append("logging { size 8192 class crypto/main { level debug rate-limit 100000 } }")
    if profile.devices:
        lines.append("devices {")
        for dev in profile.devices:
            lines += [
                f"  dev {dev.id} {{",
                f"    driver {dev.driver}",
                f"    port 0 {{ name {dev.port_name} num-rx-queues {dev.queues} "
                f"num-tx-queues {dev.queues} }}",
                "  }",
            ]
        lines.append("}")
    if profile.dpdk_devices:
        lines.append("dpdk {")
        for ddev in profile.dpdk_devices:
            lines.append(f"  dev {ddev.pci} {{ num-rx-queues {ddev.queues} "
                         f"num-tx-queues {ddev.queues} }}")
        lines.append("}")
    return "\n".join(lines) + "\n"


# ---- machine-specific options (render-startup --pci, --cores, hugepages) -------------
PCI_ADDRESS = re.compile(r"(?:([0-9a-f]{4}):)?([0-9a-f]{2}):([01][0-9a-f])\.([0-7])")
# Bytes per VPP buffer: vlib_buffer_alloc_size() (vlib/buffer_funcs.h) of the default
# 2048 data bytes behind vlib_buffer_t (128 bytes of metadata, 128 of pre-data), rounded
# to cache lines and made an odd number of them; the dpdk plugin adds an rte_mbuf header.
BUFFER_BYTES = 2368
DPDK_BUFFER_BYTES = 2496
SIZE = re.compile(r"(\d+)([KMG]?)", re.IGNORECASE)
UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
MEMINFO = Path("/proc/meminfo")
HUGEPAGES_SYSFS = Path("/sys/kernel/mm/hugepages")
NODE_SYSFS = Path("/sys/devices/system/node")


def pci_address(text: str) -> str:
    """A PCI address as VPP's startup.conf takes it (domain:bus:device.function)."""
    found = PCI_ADDRESS.fullmatch(text.strip().lower())
    if found is None:
        raise ConfigError(f"--pci {text!r} is not a PCI address: give domain:bus:device."
                          "function as `lspci -D` shows it, e.g. 0000:3b:02.0")
    domain, bus, device, function = found.groups()
    return f"{domain or '0000'}:{bus}:{device}.{function}"


def parse_cores(text: str, option: str) -> list[int]:
    """A CPU list as Linux and VPP write it ("1-3,6"), in order, without repeats."""
    cores: list[int] = []
    try:
        for part in text.split(","):
            first, _, last = part.strip().partition("-")
            low, high = int(first), int(last or first)
            if low < 0 or high < low:
                raise ValueError
            cores += [c for c in range(low, high + 1) if c not in cores]
    except ValueError:
        raise ConfigError(f"{option} {text!r} is not a CPU list: give cores like 1-3 or "
                          "2,4-6") from None
    return cores


def corelist(cores: list[int]) -> str:
    return ",".join(str(c) for c in cores)


def customize(profile: Profile, *, pci: list[str] | None = None, cores: str | None = None,
              main_core: int | None = None, workers: int | None = None) -> Profile:
    """The profile with this machine's NIC addresses and cores (render-startup's --pci,
    --cores, --main-core; `workers` as --workers gives it): the shipped hardware profiles
    name an example machine's. The NIC keeps one queue pair per worker."""
    update: dict[str, object] = {}
    if pci:
        addresses = [pci_address(p) for p in pci]
        if profile.devices:
            first = profile.devices[0]
            update["devices"] = [first.model_copy(update={
                "id": f"pci/{a}", "port_name": first.port_name if i == 0 else f"uplink{i}"})
                for i, a in enumerate(addresses)]
        elif profile.dpdk_devices:
            update["dpdk_devices"] = [profile.dpdk_devices[0].model_copy(update={"pci": a})
                                      for a in addresses]
        else:
            raise ConfigError("--pci: this profile gives VPP no NIC of its own (VPP takes "
                              "the NIC from Linux with af_packet or af_xdp); use it with "
                              "xl710-avf or bare-metal-dpdk")
    if cores is not None:
        if main_core is not None:
            raise ConfigError("--cores names the main core (its first) and the workers' "
                              "cores: give either --cores or --main-core")
        listed = parse_cores(cores, "--cores")
        update.update(main_core=listed[0], workers=len(listed) - 1,
                      corelist_workers=corelist(listed[1:]) or None)
    elif main_core is not None:
        update["main_core"] = main_core
    profile = profile.model_copy(update=update)
    count = workers if workers is not None else profile.workers
    if cores is not None or workers is not None:
        queues = max(1, count)
        profile = profile.model_copy(update={
            "devices": [d.model_copy(update={"queues": queues}) for d in profile.devices],
            "dpdk_devices": [d.model_copy(update={"queues": queues})
                             for d in profile.dpdk_devices]})
    return profile


def used_cores(profile: Profile, workers: int | None) -> list[int]:
    """The cores the rendered startup.conf pins threads to (workers placed by VPP after
    the main core count by number only)."""
    pinned = [] if profile.main_core is None else [profile.main_core]
    if profile.corelist_workers and workers is None and profile.workers:
        pinned += parse_cores(profile.corelist_workers, "corelist_workers")
    return pinned


def check_cores(profile: Profile, workers: int | None, cpus: int) -> None:
    """Refuse cores this host does not have: VPP would not start."""
    threads = 1 + (profile.workers if workers is None else workers)
    pinned = used_cores(profile, workers)
    if profile.main_core is not None and profile.main_core in pinned[1:]:
        raise ConfigError(f"core {profile.main_core} is the main thread's and a worker's: "
                          "give --cores MAIN,WORKER... with each core once")
    missing = [c for c in pinned if c >= cpus]
    if missing:
        raise ConfigError(f"core {missing[0]} does not exist on this host (it has {cpus} "
                          f"CPUs, 0-{cpus - 1}): give this host's cores with --cores "
                          "MAIN,WORKER... (e.g. --cores 1-3: main thread on 1, workers on "
                          "2 and 3), or --no-host-check to render for another machine")
    if threads > cpus:
        raise ConfigError(f"{threads - 1} workers and the main thread need {threads} cores; "
                          f"this host has {cpus}: give fewer with --workers, or "
                          "--no-host-check to render for another machine")


def size_bytes(text: str) -> int:
    found = SIZE.fullmatch(text.strip())
    if found is None:
        raise ConfigError(f"size {text!r}: give a number with K, M or G, e.g. 2G")
    return int(found.group(1)) * UNITS[found.group(2).upper()]


def _meminfo(path: Path) -> dict[str, int]:
    values = {}
    for line in path.read_text().splitlines():
        name, _, rest = line.partition(":")
        if rest.split():
            values[name.strip()] = int(rest.split()[0])
    return values


def numa_nodes(sysfs: Path | None = None) -> int:
    """NUMA nodes with CPUs: VPP makes a buffer pool (buffers-per-numa) on each."""
    try:
        return len(parse_cores(((sysfs or NODE_SYSFS) / "has_cpu").read_text(),
                               "has_cpu")) or 1
    except (OSError, ConfigError):
        return 1


@dataclass(frozen=True)
class Hugepages:
    """The hugepages a rendered startup.conf needs, and what the host has."""

    page_kb: int
    needed: int
    parts: str  # where they go, for the operator
    total: int
    free: int
    default_size: bool  # the kernel's default hugepage size (vm.nr_hugepages sets it)

    @property
    def enough(self) -> bool:
        return self.total >= self.needed

    def describe(self) -> str:
        mib = self.needed * self.page_kb // 1024
        return (f"hugepages: this startup.conf needs {self.needed} pages of {self.page_kb} kB "
                f"({mib} MiB: {self.parts}); this host has {self.total} ({self.free} free)")

    def fix(self) -> str:
        if self.page_kb >= 1 << 20:
            return (f"1G pages are reserved at boot: add `hugepagesz=1G hugepages="
                    f"{self.needed}` to the kernel command line and reboot")
        if self.default_size:
            return (f"`sysctl -w vm.nr_hugepages={self.needed}` now, and `vm.nr_hugepages = "
                    f"{self.needed}` in /etc/sysctl.d/80-vpp.conf (FD.io's vpp package "
                    "writes 1024 there) to keep it across reboots")
        return (f"`echo {self.needed} > {HUGEPAGES_SYSFS}/hugepages-{self.page_kb}kB/"
                "nr_hugepages`")


def hugepages(profile: Profile, *, meminfo: Path | None = None, sysfs: Path | None = None,
              numa: int | None = None) -> Hugepages | None:
    """What the profile's memory sections need in hugepages (None: 4K pages, none): the
    main heap, the buffers (buffers-per-numa on each NUMA node) and the stats segment,
    each rounded up to whole pages."""
    if profile.page_size == "4k":
        return None
    info = _meminfo(meminfo or MEMINFO)
    default_kb = info.get("Hugepagesize", 2048)
    page_kb = {"2M": 2048, "1G": 1 << 20}.get(profile.page_size, default_kb)
    nodes = numa_nodes() if numa is None else numa
    per_buffer = DPDK_BUFFER_BYTES if "dpdk" in profile.plugins else BUFFER_BYTES
    heap = size_bytes(profile.main_heap_size)
    buffers = profile.buffers_per_numa * per_buffer * nodes
    stats = size_bytes(profile.statseg_size)
    page = page_kb * 1024
    needed = sum(-(-part // page) for part in (heap, buffers, stats))
    parts = (f"main heap {profile.main_heap_size}, buffers {profile.buffers_per_numa} x "
             f"{per_buffer} B x {nodes} NUMA node(s) = {buffers >> 20} MiB, stats segment "
             f"{profile.statseg_size}")
    if page_kb == default_kb:
        total, free = info.get("HugePages_Total", 0), info.get("HugePages_Free", 0)
    else:
        directory = (sysfs or HUGEPAGES_SYSFS) / f"hugepages-{page_kb}kB"
        try:
            total = int((directory / "nr_hugepages").read_text())
            free = int((directory / "free_hugepages").read_text())
        except (OSError, ValueError):
            total = free = 0
    return Hugepages(page_kb=page_kb, needed=needed, parts=parts, total=total, free=free,
                     default_size=page_kb == default_kb)


# ---- sized to the mesh (render-startup --peers/--tunnels or --mesh) -----------------------
# VPP's stats segment holds a directory entry (vlib_stats_entry_t, 144 bytes: a type, an
# index or pointer and a 128-byte name; vlib/stats/shared.h) for every counter a client
# can name, and the counter vectors themselves (vlib/counter.c: one vector per thread,
# indexed by the object's index). Per tunnel of the mesh (one ipip interface, its SAs):
# - 17 symlinks /interfaces/<name>/<counter> (vnet/interface/stats.c: the 9 simple and 8
#   combined interface counters of vnet/interface.h), and 8 /nodes/<name>/<counter>
#   (vlib/stats/collector.c with per-node-counters on: 4 counters for each of the two
#   nodes, <name>-tx and <name>-output, vnet/interface.c registers per interface);
# - per thread: the interface's counters (9 x 8 + 8 x 16 bytes), its two nodes' (2 x 4 x
#   8), its midchain adjacency's (/net/adjacency, 16), and per SA /net/ipsec/sa (16) and
#   the 16 /net/ipsec/sa/err/* counters (vnet/ipsec/ipsec_sa.h, 8 each) for
#   SAS_PER_TUNNEL SAs;
# - three names (/if/names, /sys/node/names twice), each a small vector on the segment.
# Vectors grow by half again when full (vppinfra/vec.c) and a growing one is copied, so
# the old and the new copy live side by side for a moment: the directory, by far the
# largest vector (72 MB at 5000 peers x 4 tunnels), needs 2.5 times its size at its peak,
# the counter vectors 1.5 times theirs. With 4K pages the segment costs only the pages
# VPP touches, so a generous size costs little; with hugepages it is reserved whole.
STATS_ENTRY_BYTES = 144
STATS_ENTRIES_PER_TUNNEL = 17 + 2 * 4
# Two inbound generations and the outbound SA, plus the new outbound one during a
# rotation: VPP reuses freed SA indices, so the vectors follow the SAs alive at once.
SAS_PER_TUNNEL = 4
STATS_COUNTER_BYTES_PER_TUNNEL = (9 * 8 + 8 * 16) + 2 * 4 * 8 + 16 + SAS_PER_TUNNEL * (
    16 + 16 * 8)  # per thread
STATS_NAME_BYTES_PER_TUNNEL = 3 * 64
DIRECTORY_PEAK = 2.5
COUNTERS_PEAK = 1.5
# What VPP needs with no mesh: its default segment (STAT_SEGMENT_DEFAULT_SIZE, 32M, in
# vlib/stats/stats.h) holds the error, node and buffer counters of every plugin.
STATSEG_BASE = 32 << 20
# VPP's main heap: measured, not derived (benchmarks.controlplane, "VPP main heap per
# peer": 54 KiB per peer at 4 tunnels, about 14 KiB per tunnel: the SAs, the ipip
# interface, its adjacency and nodes, the route), doubled for the SAs of a rotation and
# the vectors' growth, on top of what VPP itself uses with no mesh (36 MiB with the
# testbed profile's plugins; the rest is room for endpoints and the host link).
MAIN_HEAP_PER_TUNNEL = 14 << 10
MAIN_HEAP_PEAK = 2
MAIN_HEAP_BASE = 128 << 20
SIZE_STEP = 32 << 20


@dataclass(frozen=True)
class MeshSize:
    """How large a mesh this VPP is to hold: its peers and each pair's tunnels."""

    peers: int
    tunnels: int


def _rounded(size: float) -> int:
    return -(-int(size) // SIZE_STEP) * SIZE_STEP


def statseg_bytes(mesh: MeshSize, workers: int = 0) -> int:
    """The stats segment a mesh needs: STATSEG_BASE plus, per tunnel, DIRECTORY_PEAK x 25
    directory entries of 144 bytes, COUNTERS_PEAK x 856 bytes of counters per thread
    (1 + workers) and 192 bytes of names (the figures and their sources above), rounded
    up to 32 MiB. At 4 tunnels about 41 KiB per peer with no workers: 96M for 1000 peers,
    256M for 5000 (VPP 26.06 stopped answering there with the profiles' 64M; with 256M
    it answered, 81 MiB of the segment in use after the first reconcile, 4 KiB per
    tunnel: the peak factors are the headroom for growth and rotations)."""
    threads = 1 + workers
    per_tunnel = (DIRECTORY_PEAK * STATS_ENTRIES_PER_TUNNEL * STATS_ENTRY_BYTES
                  + COUNTERS_PEAK * STATS_COUNTER_BYTES_PER_TUNNEL * threads
                  + STATS_NAME_BYTES_PER_TUNNEL)
    return _rounded(STATSEG_BASE + per_tunnel * mesh.peers * mesh.tunnels)


def main_heap_bytes(mesh: MeshSize) -> int:
    """VPP's main heap a mesh needs: MAIN_HEAP_BASE plus MAIN_HEAP_PEAK x 14 KiB per
    tunnel (measured, see above), rounded up to 32 MiB."""
    return _rounded(MAIN_HEAP_BASE
                    + MAIN_HEAP_PEAK * MAIN_HEAP_PER_TUNNEL * mesh.peers * mesh.tunnels)


def _size_text(size: int) -> str:
    return f"{size >> 30}G" if size % (1 << 30) == 0 else f"{size >> 20}M"


def fit_to_mesh(profile: Profile, mesh: MeshSize, workers: int | None = None) -> Profile:
    """The profile with a main heap and a stats segment large enough for `mesh`: the
    profile's own sizes are a floor, raised (with a log line naming the field) where the
    mesh needs more. A VPP whose stats segment is full stops answering; the raised sizes
    then go through the same hugepage check as the profile's own."""
    if mesh.peers < 0 or mesh.tunnels < 1:
        raise ConfigError(f"a mesh of {mesh.peers} peers x {mesh.tunnels} tunnels: give "
                          "--peers 0 or more and --tunnels 1 or more")
    n_workers = profile.workers if workers is None else workers
    update = {}
    for field, needed in (("main_heap_size", main_heap_bytes(mesh)),
                          ("statseg_size", statseg_bytes(mesh, n_workers))):
        given = getattr(profile, field)
        if size_bytes(given) < needed:
            update[field] = _size_text(needed)
            log.warning("%s %s is too small for %d peers x %d tunnels: raised to %s",
                        field, given, mesh.peers, mesh.tunnels, update[field])
    return profile.model_copy(update=update)

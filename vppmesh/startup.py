"""Render a VPP startup.conf from a profile (vpp-startup/, shipped with the package as
vppmesh/profiles/).

A profile captures what differs between machines (cores, pages, buffers, drivers); the
rendering adds what differs between instances on one machine (runtime directory, API
and CLI sockets, shared-memory prefix), so several VPPs can run side by side.
"""

from __future__ import annotations

import logging
import os
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


PACKAGE_PROFILES = Path(__file__).resolve().parent / "profiles"
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

"""Network-namespace plumbing for the benchmarks.

Everything the benchmarks create is named with the ``vmb`` prefix (namespaces ``vmb-*``,
links ``vmb*``) so that :func:`cleanup_all` can remove leftovers of a crashed run without
ever touching anything else on the machine.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pyroute2 import IPRoute  # type: ignore[import-untyped]
from pyroute2 import netns as pr_netns

NS_PREFIX = "vmb-"
LINK_PREFIX = "vmb"
TMP_PREFIX = "vmb-"
WIREGUARD_RUN_DIR = Path("/var/run/wireguard")
VPP_RUN_DIR = Path("/run/vppmesh-bench")  # runtime dirs of the VPP contenders
IFNAMSIZ = 15


class CommandError(RuntimeError):
    """A command run for the benchmark failed; carries its output for the report."""

    def __init__(self, description: str, returncode: int | None, output: str) -> None:
        self.description = description
        self.returncode = returncode
        self.output = output
        super().__init__(f"{description} failed (rc={returncode}): {output.strip()[:500]}")


def check_ns_name(name: str) -> str:
    """Refuse names outside our prefix so helpers can never act on foreign namespaces."""
    if not name.startswith(NS_PREFIX) or len(name) <= len(NS_PREFIX) or "/" in name:
        raise ValueError(f"namespace name must start with {NS_PREFIX!r}: {name!r}")
    return name


def check_link_name(name: str) -> str:
    """Refuse link names outside our prefix or longer than the kernel allows."""
    if not name.startswith(LINK_PREFIX) or len(name) > IFNAMSIZ:
        raise ValueError(f"link name must start with {LINK_PREFIX!r}, <= {IFNAMSIZ}: {name!r}")
    return name


def ns_argv(ns: str | None, argv: Sequence[str]) -> list[str]:
    """Prefix ``argv`` with ``ip netns exec`` when a namespace is given."""
    if ns is None:
        return list(argv)
    return ["ip", "netns", "exec", check_ns_name(ns), *argv]


def _describe(argv: Sequence[str], redact: bool) -> str:
    """Describe a command for errors; redacted ones show only the program (keys in argv)."""
    if redact:
        return f"{' '.join(argv[:5])} ... (arguments redacted)"
    return " ".join(argv)


def run_in(
    ns: str | None,
    argv: Sequence[str],
    *,
    check: bool = True,
    timeout: float = 30.0,
    redact: bool = False,
    input_text: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a command (inside ``ns`` if given) and capture its output.

    ``redact`` keeps the arguments out of error messages, for commands that carry keys.
    """
    full = ns_argv(ns, argv)
    try:
        proc = subprocess.run(
            full,
            capture_output=True,
            text=True,
            timeout=timeout,
            input=input_text,
            stdin=None if input_text is not None else subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired:
        raise CommandError(_describe(full, redact), None, f"timed out after {timeout}s") from None
    except FileNotFoundError as exc:
        raise CommandError(_describe(full, redact), None, str(exc)) from None
    if check and proc.returncode != 0:
        raise CommandError(_describe(full, redact), proc.returncode, proc.stderr + proc.stdout)
    return proc


def popen_in(ns: str | None, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
    """Start a long-running command inside ``ns``; ``ip netns exec`` execs, so pid is its own."""
    kwargs.setdefault("stdin", subprocess.DEVNULL)
    return subprocess.Popen(ns_argv(ns, argv), **kwargs)


def list_namespaces(prefix: str = NS_PREFIX) -> list[str]:
    """Names of the named namespaces starting with ``prefix``."""
    return sorted(n for n in pr_netns.listnetns() if n.startswith(prefix))


def namespace_exists(name: str) -> bool:
    """Whether the named namespace exists."""
    return name in pr_netns.listnetns()


def namespace_pids(name: str) -> list[int]:
    """Processes whose network namespace is ``name`` (they keep it alive after deletion)."""
    proc = run_in(None, ["ip", "netns", "pids", check_ns_name(name)], check=False)
    return [int(tok) for tok in proc.stdout.split() if tok.isdigit()]


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` still exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def kill_pids(pids: Sequence[int], grace: float = 2.0) -> None:
    """SIGTERM, then SIGKILL whatever has not gone after ``grace`` seconds."""
    own = os.getpid()
    targets = [p for p in pids if p not in (own, 0, 1)]
    for pid in targets:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(pid_alive(p) for p in targets):
        time.sleep(0.05)
    for pid in targets:
        if pid_alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def stop_process(proc: subprocess.Popen[Any] | None, grace: float = 3.0) -> None:
    """Terminate a child we started and reap it, escalating to SIGKILL."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=grace)


def create_namespace(name: str) -> None:
    """Create a fresh namespace (replacing a stale one) with loopback up."""
    check_ns_name(name)
    if namespace_exists(name):
        delete_namespace(name)
    pr_netns.create(name)
    with IPRoute(netns=name) as ipr:
        ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")


def delete_namespace(name: str) -> None:
    """Kill the namespace's processes and delete it; a missing namespace is fine."""
    check_ns_name(name)
    if not namespace_exists(name):
        return
    kill_pids(namespace_pids(name))
    with contextlib.suppress(FileNotFoundError, OSError):
        pr_netns.remove(name)


def _link_index(ipr: IPRoute, ifname: str) -> int:
    found = ipr.link_lookup(ifname=ifname)
    if not found:
        raise CommandError(f"lookup of link {ifname}", None, "no such link")
    return int(found[0])


def add_veth(a: str, a_ns: str, b: str, b_ns: str, mtu: int = 1500) -> None:
    """Create a veth pair with one end in each namespace, both up."""
    check_link_name(a)
    check_link_name(b)
    with IPRoute(netns=check_ns_name(a_ns)) as ipr:
        ipr.link("add", ifname=a, kind="veth", peer={"ifname": b, "net_ns_fd": b_ns})
    configure_link(a_ns, a, mtu=mtu)
    configure_link(b_ns, b, mtu=mtu)


def configure_link(
    ns: str, ifname: str, *, cidr: str | None = None, mtu: int | None = None, up: bool = True
) -> None:
    """Set MTU, add an address (``a.b.c.d/len``) and bring the link up."""
    with IPRoute(netns=check_ns_name(ns)) as ipr:
        idx = _link_index(ipr, ifname)
        if mtu is not None:
            ipr.link("set", index=idx, mtu=mtu)
        if cidr is not None:
            addr, plen = cidr.split("/")
            ipr.addr("add", index=idx, address=addr, prefixlen=int(plen))
        if up:
            ipr.link("set", index=idx, state="up")


def link_exists(ns: str, ifname: str) -> bool:
    """Whether ``ifname`` exists in ``ns``."""
    with IPRoute(netns=check_ns_name(ns)) as ipr:
        return bool(ipr.link_lookup(ifname=ifname))


def replace_route(
    ns: str,
    dst: str,
    *,
    gateway: str | None = None,
    dev: str | None = None,
    mtu: int | None = None,
) -> None:
    """Install or replace a route; ``dst`` may be ``default``."""
    spec: dict[str, Any] = {"dst": "0.0.0.0/0" if dst == "default" else dst}
    if gateway is not None:
        spec["gateway"] = gateway
    if mtu is not None:
        spec["metrics"] = {"mtu": mtu}
    with IPRoute(netns=check_ns_name(ns)) as ipr:
        if dev is not None:
            spec["oif"] = _link_index(ipr, dev)
        ipr.route("replace", **spec)


def set_sysctl(ns: str, key: str, value: str | int) -> None:
    """Set a per-namespace sysctl such as ``net.ipv4.ip_forward``."""
    run_in(ns, ["sysctl", "-qw", f"{key}={value}"])


def make_tempdir(label: str) -> Path:
    """A private (0700) scratch directory that :func:`cleanup_all` knows how to find."""
    return Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{label}-"))


def _root_links() -> list[str]:
    with IPRoute() as ipr:
        names = [link.get("ifname") for link in ipr.get_links()]
    return [n for n in names if isinstance(n, str) and n.startswith(LINK_PREFIX)]


def cleanup_all() -> list[str]:
    """Remove every ``vmb`` namespace, root-namespace link, socket and scratch dir.

    Safe to call at any time and any number of times, in particular after a run that
    died half-way; returns what it removed so callers can report it.
    """
    removed: list[str] = []
    for name in list_namespaces():
        delete_namespace(name)
        removed.append(f"netns {name}")
    for link in _root_links():
        with contextlib.suppress(Exception), IPRoute() as ipr:
            ipr.link("del", index=_link_index(ipr, link))
            removed.append(f"link {link}")
    for sock in glob.glob(str(WIREGUARD_RUN_DIR / f"{LINK_PREFIX}*.sock")):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(sock)
            removed.append(f"socket {sock}")
    for shm in glob.glob(f"/dev/shm/{NS_PREFIX}*"):  # VPP's shared memory, after a kill -9
        with contextlib.suppress(FileNotFoundError):
            os.unlink(shm)
            removed.append(f"shm {shm}")
    if VPP_RUN_DIR.exists():
        shutil.rmtree(VPP_RUN_DIR, ignore_errors=True)
        removed.append(f"dir {VPP_RUN_DIR}")
    for tmp in glob.glob(os.path.join(tempfile.gettempdir(), f"{TMP_PREFIX}*")):
        if os.path.isdir(tmp) and not os.path.islink(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
            removed.append(f"dir {tmp}")
    return removed

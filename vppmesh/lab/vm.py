"""Run a command inside a throwaway VM guest that has /dev/vhost-net.

The tap v2 path (pods and the host link as virtio taps with GSO/GRO and one queue pair
per VPP worker) needs vhost-net, which a container or a PVM host may lack. virtme-ng
boots a Debian kernel (whose modules include vhost_net) on a snapshot of this machine's
own filesystem, so the guest has the same Python, venv, VPP and tools; nothing is
installed in it. Details and caveats: docs/vm.md.

- The guest's root is the host's, read-only (copy-on-write overlays for /etc, /tmp,
  /var...); directories given as `rwdirs` are shared read-write, which is how results
  come back. Unix sockets do not work on the shared 9p filesystem, so VPP's runtime
  directories (API, CLI and stats sockets) must be on the guest's tmpfs: the testbed's
  /run/... is.
- KVM is not used unless asked for (`VPPMESH_VM_KVM=1`): on a PVM host (kvm_pvm) a stock
  kernel does not boot. Software emulation (TCG) is slow but correct; throughput
  measured in such a guest means nothing.
- The emulated CPU has no AVX-512: the VPP given to the guest must be a generic
  (multi-arch) build, as FD.io's packages are.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from vppmesh.errors import VppMeshError

KERNEL_ENV = "VPPMESH_VM_KERNEL"
VPP_ENV = "VPPMESH_VM_VPP"
KVM_ENV = "VPPMESH_VM_KVM"
QEMU = "qemu-system-x86_64"
# Environment passed on into the guest (virtme-ng starts the command with a fresh one).
PASSED_ENV = ("VPPMESH_STARTUP_DIR", "PYTHONPATH")
INSTALL_HINT = ("apt-get install qemu-system-x86 linux-image-amd64 busybox-static; "
                "pip install virtme-ng (make vm-test does both)")


class VmError(VppMeshError):
    """No guest can be booted here (qemu, kernel or virtme-ng missing), or it failed."""


@dataclass(frozen=True)
class GuestSpec:
    """One guest: its size and what it shares with the host."""

    cpus: int = 4
    memory: str = "4G"
    rwdirs: tuple[Path, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    timeout: float = 1800


def _kernel_version(path: Path) -> str:
    return path.name.removeprefix("vmlinuz-")


def _version_key(path: Path) -> list[int | str]:
    return [int(p) if p.isdigit() else p for p in re.split(r"[.-]", _kernel_version(path))]


def has_vhost_net(kernel: Path) -> bool:
    """Whether the kernel's modules (or the kernel itself) provide vhost_net."""
    version = _kernel_version(kernel)
    modules = Path("/lib/modules") / version
    if any((modules / "kernel/drivers/vhost").glob("vhost_net.ko*")):
        return True
    builtin = modules / "modules.builtin"
    return builtin.exists() and "vhost_net.ko" in builtin.read_text()


def find_kernel() -> Path:
    """$VPPMESH_VM_KERNEL, else the newest /boot/vmlinuz-* whose modules have vhost_net."""
    if env := os.environ.get(KERNEL_ENV):
        path = Path(env)
        if not path.is_file():
            raise VmError(f"{KERNEL_ENV}={env} is not a file")
        return path
    kernels = sorted(Path("/boot").glob("vmlinuz-*"), key=_version_key, reverse=True)
    for kernel in kernels:
        if os.access(kernel, os.R_OK) and has_vhost_net(kernel):
            return kernel
    raise VmError("no kernel with vhost_net in /boot: " + INSTALL_HINT)


def find_vng() -> Path:
    """virtme-ng's `vng`, next to this Python (a venv) or on PATH."""
    beside = Path(sys.executable).parent / "vng"
    if beside.exists():
        return beside
    found = shutil.which("vng")
    if found is None:
        raise VmError("virtme-ng (vng) is not installed: " + INSTALL_HINT)
    return Path(found)


def find_qemu() -> Path:
    found = shutil.which(QEMU)
    if found is None:
        raise VmError(f"{QEMU} is not installed: " + INSTALL_HINT)
    return Path(found)


def find_guest_vpp() -> Path:
    """The VPP for the guest: $VPPMESH_VM_VPP, else the testbed's ($VPPMESH_VPP, PATH)."""
    from vppmesh.lab.testbed import TestbedError, find_vpp

    if env := os.environ.get(VPP_ENV):
        path = Path(env)
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise VmError(f"{VPP_ENV}={env} is not an executable file")
        return path
    try:
        return find_vpp()
    except TestbedError:
        raise VmError(f"no VPP for the guest: set {VPP_ENV} or VPPMESH_VPP to a generic "
                      "(multi-arch) vpp binary, or put vpp on PATH") from None


def missing() -> str | None:
    """Why no guest can be booted here, in one line; None when everything is there."""
    if os.geteuid() != 0:
        return "the VM guest runs VPP and namespaces as root: run as root"
    if shutil.which("busybox") is None:
        return "busybox-static is missing (virtme-ng's initramfs): " + INSTALL_HINT
    try:
        find_qemu()
        find_vng()
        find_kernel()
    except VmError as exc:
        return str(exc)
    return None


def guest_script(command: list[str], *, cwd: Path, env: dict[str, str],
                 status_file: Path | None = None, output: Path | None = None) -> str:
    """The shell script the guest runs: vhost-net, the environment, then `command`.

    With `output` (in a shared directory), the command's output goes there as it is
    written; the guest's console reaches the host only in large, late chunks.
    """
    exports = {"PYTHONDONTWRITEBYTECODE": "1", "VPPMESH_VM_GUEST": "1",
               "VPPMESH_VPP_START_TIMEOUT": "600", "VPPMESH_TESTBED_COMMAND_TIMEOUT": "1500",
               "PATH": f"{Path(sys.executable).parent}:/usr/sbin:/usr/bin:/sbin:/bin"}
    exports |= {k: v for k in PASSED_ENV if (v := os.environ.get(k))}
    exports |= env
    lines = [
        "modprobe vhost_net; modprobe tun",
        # vhost-net is crw-rw---- root:kvm; VPP runs as root, so that is enough.
        "[ -c /dev/vhost-net ] || { echo 'guest: no /dev/vhost-net' >&2; exit 97; }",
        *(f"export {k}={shlex.quote(v)}" for k, v in exports.items()),
        f"cd {shlex.quote(str(cwd))}",
        shlex.join(command) + (f" > {shlex.quote(str(output))} 2>&1" if output else ""),
    ]
    if status_file is not None:
        lines.append(f"echo $? > {shlex.quote(str(status_file))}")
    return "; ".join(lines)


def vng_command(command: list[str], spec: GuestSpec, *, cwd: Path,
                status_file: Path | None = None, output: Path | None = None) -> list[str]:
    """The virtme-ng command line that boots the guest and runs `command` in it."""
    args = [str(find_vng()), "--run", str(find_kernel()), "--cpus", str(spec.cpus),
            "--memory", spec.memory, "--qemu", str(find_qemu())]
    if os.environ.get(KVM_ENV) != "1":
        args.append("--disable-kvm")
    for directory in spec.rwdirs:
        args += ["--rwdir", str(directory)]
    args += ["--exec", guest_script(command, cwd=cwd, env=spec.env, status_file=status_file,
                                    output=output)]
    return args


def follow(path: Path, sink: BinaryIO, done: threading.Event,
           interval: float = 0.5) -> None:
    """Copy what the guest writes to `path` (a shared file) to `sink` as it grows, until
    `done` is set and everything written has been copied."""
    offset = 0
    while True:
        finished = done.is_set()
        try:
            with path.open("rb") as f:
                f.seek(offset)
                chunk = f.read()
        except FileNotFoundError:
            chunk = b""
        if chunk:
            offset += len(chunk)
            sink.write(chunk)
            sink.flush()
        if finished:
            return
        done.wait(interval)


def descendants(pid: int) -> list[int]:
    """Every process below `pid`, from /proc (children before grandchildren)."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # gone meanwhile
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, queue = [], [pid]
    while queue:
        children = parents.get(queue.pop(0), [])
        found += children
        queue += children
    return found


def stop_tree(proc: subprocess.Popen[bytes], grace: float = 5.0) -> None:
    """Stop `proc`, its process group and every process below it: SIGTERM, then SIGKILL
    after `grace` seconds. Nothing of the guest outlives the call."""
    import signal
    import time

    pids = [proc.pid, *descendants(proc.pid)]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids += [p for p in descendants(proc.pid) if p not in pids]
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            if proc.poll() is not None and not any(_alive(p) for p in pids[1:]):
                return
            time.sleep(0.05)
    proc.wait()


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"  # a zombie has stopped; its parent (gone too) reaps it


class _Terminated(BaseException):
    """SIGTERM or SIGHUP arrived while the guest ran (see _signals_stop_the_guest)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


@contextlib.contextmanager
def _signals_stop_the_guest() -> Iterator[None]:
    """While the guest runs, SIGTERM and SIGHUP (a CI job cancelled, a terminal closed)
    raise _Terminated, so that run() stops the guest's whole tree before this process
    ends as the signal would have ended it: by default they end it at once and leave
    qemu running."""
    import signal

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminated(signum: int, _frame: object) -> None:
        raise _Terminated(signum)

    before = {sig: signal.signal(sig, terminated) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


def run(command: list[str], spec: GuestSpec, *, cwd: Path | None = None,
        log: Path | None = None, output: Path | None = None) -> int:
    """Boot a guest, run `command` in it (as root, in `cwd`) and return its exit code.

    The exit code comes back through a file in the first of `spec.rwdirs` (one is made
    if none is given), so it does not depend on how virtme-ng reports it. `log` takes
    virtme-ng's console, `output` (in a shared directory) the command's own output.
    Without `output`, the command's output is copied to this process's stdout as the
    guest writes it, and the console (the kernel's boot messages) is kept out of it:
    through virtme-ng's console, console and command output reached a redirected file at
    different offsets and overwrote each other.
    """
    try:
        return _run(command, spec, cwd=cwd, log=log, output=output)
    except _Terminated as exc:  # the guest is stopped: now the signal does what it does
        os.kill(os.getpid(), exc.signum)
        raise


def _run(command: list[str], spec: GuestSpec, *, cwd: Path | None, log: Path | None,
         output: Path | None) -> int:
    import tempfile

    reason = missing()
    if reason is not None:
        raise VmError(reason)
    cwd = cwd or Path.cwd()
    with tempfile.TemporaryDirectory(prefix="vppmesh-vm-") as scratch:
        rwdirs = spec.rwdirs or (Path(scratch),)
        spec = GuestSpec(cpus=spec.cpus, memory=spec.memory, rwdirs=rwdirs, env=spec.env,
                         timeout=spec.timeout)
        status_file = rwdirs[0] / f".vppmesh-vm-status-{os.getpid()}"
        status_file.unlink(missing_ok=True)
        streamed = output is None
        if streamed:
            output = rwdirs[0] / f".vppmesh-vm-output-{os.getpid()}"
            output.unlink(missing_ok=True)
            log = log or Path(scratch) / "console.log"
        args = vng_command(command, spec, cwd=cwd, status_file=status_file, output=output)
        # vng starts its helpers (virtme-run) from PATH: the venv's bin must be on it.
        env = dict(os.environ)
        env["PATH"] = f"{Path(args[0]).parent}:{env.get('PATH', '/usr/bin:/bin')}"
        out = log.open("w") if log is not None else None
        done = threading.Event()
        copier = threading.Thread(target=follow, args=(output, sys.stdout.buffer, done),
                                  daemon=True) if streamed else None
        # Its own session, so that a time-out or an interrupt stops qemu and virtme-ng's
        # helpers with it, not vng alone (which left the guest running at full CPU).
        guest = subprocess.Popen(args, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                 stderr=subprocess.STDOUT if out else None,
                                 start_new_session=True)
        try:
            with _signals_stop_the_guest():
                if copier is not None:
                    copier.start()
                returncode = guest.wait(timeout=spec.timeout)
        except subprocess.TimeoutExpired:
            raise VmError(f"the guest did not finish within {spec.timeout:.0f} s") from None
        finally:
            stop_tree(guest)
            if out is not None:
                out.close()
            done.set()
            if copier is not None:
                copier.join()
                output.unlink(missing_ok=True)  # type: ignore[union-attr]
        if not status_file.exists():
            tail = log.read_text()[-1500:] if log is not None else ""
            raise VmError(f"the guest ended without running the command (vng exit "
                          f"{returncode}){': ' + tail if tail.strip() else ''}")
        code = int(status_file.read_text().strip() or 1)
        status_file.unlink(missing_ok=True)
        return code

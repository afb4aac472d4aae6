"""`vppmesh vpp-run -- VPP-COMMAND`: VPP as a child, and the host's NIC back whenever it exits.

With `--take-uplink` and an af_packet or af_xdp NIC, the host's addresses and routes live
on a host link that only exists through VPP. Whatever stops VPP (a DaemonSet rolling
update or uninstall, `systemctl stop vpp`, a crash, the OOM killer) leaves the host with
no network until someone gives the NIC back (`uplink.release_all`). The running agent
does that when it sees VPP gone, but the cases that matter most stop the agent too: a
rolling update replaces the whole pod, and in Kubernetes a host without its network
cannot reach the API server or a registry, so the replacement pod never comes and the
node is lost until someone opens its console.

So VPP runs under a guard that outlives it, as Calico/VPP's vpp-manager does: this
process starts VPP as its child, passes it SIGTERM, SIGINT and SIGHUP (a container
runtime signals the container's main process only), waits for it, and when it exits, for
whatever reason, gives every taken NIC back to Linux from the saved JSON in the state
directory, then exits with VPP's status (128 + the signal when VPP was killed, as a
shell says it). The guard itself is a small Python process with nothing to do while VPP
runs, so the OOM killer picks VPP, not it. A VPP that ignores the forwarded signal is
killed after `kill_after` seconds, well inside the DaemonSet's 30 s grace period, so the
NIC is given back before the runtime kills what is left. The next VPP (the replacement
pod, a restart) is taken over again by the agent, as after any VPP restart.

A preStop hook would add nothing: it runs only for a stop the kubelet asks for (not for a
crash or an OOM kill), before VPP stops, while VPP still carries the host's traffic.
On a plain host systemd is the guard (`ExecStopPost` in a drop-in for vpp.service,
written by `vppmesh install-unit`).
"""

from __future__ import annotations

import logging
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType

from vppmesh.errors import ConfigError

log = logging.getLogger("vppmesh")

FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
# After a forwarded signal, how long VPP gets before it is killed (VPP ignores SIGTERM
# while it starts): shorter than the DaemonSet's terminationGracePeriodSeconds (30), so
# the NIC goes back before the runtime kills the container.
KILL_AFTER_SECONDS = 10.0


def exit_status(returncode: int) -> int:
    """The child's status as a shell reports it: 128 + N when signal N killed it."""
    return 128 - returncode if returncode < 0 else returncode


class Guard:
    """Runs one VPP and gives the NICs back when it ends (see the module docstring)."""

    def __init__(self, command: Sequence[str], state_dir: Path, *,
                 kill_after: float = KILL_AFTER_SECONDS) -> None:
        if not command:
            raise ConfigError("vpp-run: give VPP's command after --, e.g. `vppmesh vpp-run "
                              "-- vpp -c /etc/vpp/startup.conf`")
        self.command = list(command)
        self.state_dir = state_dir
        self.kill_after = kill_after
        self.child: subprocess.Popen[bytes] | None = None
        self.pending: int | None = None  # a signal that came before VPP was started
        self.killer: threading.Timer | None = None

    def forward(self, signum: int, _frame: FrameType | None = None) -> None:
        """Pass the signal to VPP; kill VPP if it has not exited `kill_after` later."""
        if self.child is None:
            self.pending = signum
            return
        log.info("vpp-run: %s passed to VPP (pid %d)", signal.Signals(signum).name,
                 self.child.pid)
        self.child.send_signal(signum)
        if self.killer is None:
            self.killer = threading.Timer(self.kill_after, self._kill)
            self.killer.daemon = True
            self.killer.start()

    def _kill(self) -> None:
        if self.child is not None and self.child.poll() is None:
            log.warning("vpp-run: VPP still runs %.0f s after the signal: killing it",
                        self.kill_after)
            self.child.kill()

    def run(self) -> int:
        """Start VPP, wait for it, give the NICs back; VPP's exit status."""
        # Imported before VPP starts: giving the NIC back must not wait for imports, nor
        # fail on them, once VPP is gone.
        from vppmesh.host import uplink

        previous = {sig: signal.signal(sig, self.forward) for sig in FORWARDED}
        try:
            try:
                self.child = subprocess.Popen(self.command)
            except OSError as exc:
                raise ConfigError(f"vpp-run: cannot start {self.command[0]!r}: {exc}") \
                    from None
            log.info("vpp-run: VPP started (pid %d); its NICs go back to Linux when it "
                     "exits (state %s)", self.child.pid, self.state_dir)
            if self.pending is not None:
                self.forward(self.pending)
            returncode = self.child.wait()
            if self.killer is not None:
                self.killer.cancel()
            status = exit_status(returncode)
            # Still under our handlers: a second SIGTERM must not cut the give-back short.
            give_back(uplink.release_all, self.state_dir, status)
            return status
        finally:
            if self.killer is not None:
                self.killer.cancel()
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def give_back(release: Callable[[Path], list[str]], state_dir: Path, status: int) -> None:
    """Every taken NIC back to Linux, each logged; a failure is logged, never raised (the
    exit status stays VPP's)."""
    started = time.monotonic()
    try:
        lines = release(state_dir)
    except Exception as exc:  # the host's network is at stake: say so, loudly
        log.error("vpp-run: VPP exited (status %d) and the NIC could not be given back: %s; "
                  "run `vppmesh uplink restore --all --state-dir %s`", status, exc, state_dir)
        return
    for line in lines:
        log.warning("vpp-run: VPP exited (status %d); uplink: %s", status, line)
    if lines:
        log.info("vpp-run: the host had its network back %.0f ms after VPP exited",
                 (time.monotonic() - started) * 1000)
    else:
        log.info("vpp-run: VPP exited with status %d; no taken NIC to give back", status)


def run(command: Sequence[str], state_dir: Path, *,
        kill_after: float = KILL_AFTER_SECONDS) -> int:
    return Guard(command, state_dir, kill_after=kill_after).run()

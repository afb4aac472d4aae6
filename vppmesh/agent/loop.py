"""The one loop of a long-running agent, and `vppmesh up --watch` with a mesh file.

Loop drives a node.Agent (one VPP connection, the local view kept while the mesh
is unchanged, only changed peers re-applied) for both kinds of agent: `up --watch`,
which runs it on a timer and on mesh file changes (watch_loop), and the datastore agent
(datastore/membership.py), which runs it on membership changes. Recovering from VPP restarts,
re-attaching pods and filling the metrics happen in Loop.step, for both. Printing
what a run changed is the caller's: it passes `report`.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from vppmesh.agent import hardening, node
from vppmesh.agent.secrecy import Secrecy, channel_socket
from vppmesh.dataplane.vpp.stats import SaCounters
from vppmesh.errors import (
    SourceUnavailableError,
    UplinkMissingError,
    VppMeshError,
    VppUnavailableError,
)

if TYPE_CHECKING:
    from vppmesh.agent.control import Control
    from vppmesh.dataplane.vpp.client import VppApi
    from vppmesh.ops.metrics import AgentMetrics, MetricsTls

log = logging.getLogger("vppmesh")

WATCH_POLL_SECONDS = 2.0
WATCH_FILE_CHECK_SECONDS = 0.2
# While VPP is away the agent knocks this often: pods wait for the first answer.
WATCH_VPP_RETRY_SECONDS = 0.25
# The shortest gap between two runs the agents' channel asks for (Loop.may_run_early).
EARLY_MIN_GAP = 0.05
# On average, the runs the channel asks for before the poll's schedule take at most this
# share of a core (EarlyRuns); a burst of them may take EARLY_BURST seconds at once.
EARLY_BUDGET = 0.01
EARLY_BURST = 1.0
# How long after VPP (re)appeared a missing uplink is waited for rather than an error.
UPLINK_WAIT = 30.0
# After SIGTERM: how long the agent watches whether VPP is going away too.
VPP_STOP_GRACE_SECONDS = 3.0


def start_metrics(listen: str, tls: MetricsTls | None = None) -> AgentMetrics:
    """Serve Prometheus metrics on `listen` (ADDR:PORT), over HTTPS with `tls`; the
    exporter the loop fills."""
    from vppmesh.ops.metrics import AgentMetrics, MetricsServer, parse_listen

    address = parse_listen(listen)
    exporter = AgentMetrics()
    server = MetricsServer(exporter, address, tls).start()
    clients = f", clients need a certificate from {tls.client_ca}" \
        if tls is not None and tls.client_ca is not None else ""
    log.info("metrics on %s://%s:%d/metrics%s", server.scheme, address[0], server.port,
             clients)
    return exporter


def sleep(seconds: float) -> bool:
    time.sleep(seconds)
    return False


def poll_ticks(path: Path, hurry: Callable[[], bool] = lambda: False,
               wait: Callable[[float], bool] = sleep,
               stop: threading.Event | None = None,
               early_in: Callable[[], float] = lambda: 0.0,
               vpp_socket: Path | None = None) -> Iterator[None]:
    """Yield every WATCH_POLL_SECONDS, at once when `path` changes or VPP's API socket
    `vpp_socket` is made again or removed (VPP restarted or stopped: the recovery, or
    giving the uplinks back, need not wait for the next poll), and when `wait` (which
    waits up to the seconds it is given: the agents' channel) says so.

    A plain timer rather than filesystem events: the agent must run on schedule however
    busy the directory is (rekeys, key limits and receiver windows depend on it), and a
    stream of unrelated events must not be able to starve it. While `hurry()` (VPP is
    away) the next tick comes after WATCH_VPP_RETRY_SECONDS. Ends once `stop` is set.
    A tick the channel asks for comes as soon as `early_in()` (the seconds until a run
    may come early: Loop spaces such runs by their cost) allows, not at the next
    file check.
    """
    watched = [path] if vpp_socket is None else [path, vpp_socket]
    signature = [node.file_signature(p) for p in watched]
    stop = stop or threading.Event()
    while not stop.is_set():
        interval = WATCH_VPP_RETRY_SECONDS if hurry() else WATCH_POLL_SECONDS
        deadline = time.monotonic() + interval
        wanted = False
        while time.monotonic() < deadline and not stop.is_set():
            pause = min(WATCH_FILE_CHECK_SECONDS, interval)
            if wanted:
                pause = min(pause, max(0.0, early_in()))
            wanted |= wait(pause)
            if wanted and early_in() <= 0:
                break
            now = [node.file_signature(p) for p in watched]
            if now != signature:
                signature = now
                break
        if not stop.is_set():
            yield


def give_back_uplinks(opts: node.NodeOptions) -> None:
    """VPP went away: the NICs it had go back to Linux, so the host stays reachable."""
    from vppmesh.host.uplink import release_all

    try:
        for line in release_all(opts.state_dir):
            log.warning("VPP is gone: %s given back to Linux", line)
    except VppMeshError as exc:
        log.error("%s", exc)


def vpp_stops_within(api_socket: Path, grace: float) -> bool:
    """Whether VPP stops within `grace` seconds: one registered API connection, watched
    until VPP's end closes (a stopped or killed VPP's kernel closes it at once), then left
    with sockclnt_delete. A VPP that does not answer the handshake within `grace` (nothing
    listens; a dead VPP's socket file may stay on a hostPath) counts as stopped.

    Never a connect-and-close probe: VPP's socket server drops a client that just closes
    only when its read() fails with an errno other than EAGAIN, and a stale EAGAIN from an
    earlier call leaves the dead connection readable in its epoll set for good. Thirty
    such probes in three seconds on a loaded machine left VPP 26.06 answering neither its
    API nor its CLI (tests/test_uplink_vpp.py ran into it). A client that says
    sockclnt_delete is closed by VPP itself.
    """
    from vppmesh.dataplane.vpp.channel import ApiChannel
    from vppmesh.dataplane.vpp.client import CLIENT_NAME

    started = time.monotonic()
    channel = ApiChannel(api_socket, max(grace, 0.1))
    try:
        channel.open(f"{CLIENT_NAME}-stopping-{os.getpid()}", definitions=False)
    except (OSError, VppMeshError):
        return True
    try:
        return channel.closed_within(grace - (time.monotonic() - started))
    finally:
        channel.close()


def leave_uplinks(opts: node.NodeOptions, grace: float | None = None,
                  stops_within: Callable[[Path, float], bool] | None = None) -> None:
    """The agent stops (SIGTERM): a taken af_packet/af_xdp NIC goes back to Linux only if
    VPP stops within `grace` too.

    VPP and the agent stopped together (a DaemonSet rolling update signals both
    containers at once): VPP's guard (`vppmesh vpp-run`; on a host the vpp.service
    drop-in) gives the NIC back, and this is the second line, for a VPP run without
    either. uplink.release_all takes a lock, so whichever comes second finds the NIC back
    already. VPP still running after `grace` means only the agent stops (an agent
    upgrade, README "Upgrades"): the NIC stays VPP's and the host's traffic goes on.
    """
    from vppmesh.host.uplink import releasable

    if not releasable(opts.state_dir):
        return
    stops_within = stops_within or vpp_stops_within
    if not stops_within(opts.api_socket,
                        VPP_STOP_GRACE_SECONDS if grace is None else grace):
        log.info("VPP still answers: the uplink stays VPP's (only the agent stops)")
        return
    give_back_uplinks(opts)


class EarlyRuns:
    """When a run the agents' channel asks for may come before the poll's schedule.

    Such a run only hastens what the next poll (WATCH_POLL_SECONDS) would do anyway: a
    rotation's next step, a restarted peer's new keys. Two rules space them:

    - after each plain run, three times its duration (EARLY_MIN_GAP at least): a small
      mesh answers its peers within a tenth of a second, a large one batches their
      messages instead of running back to back;
    - on average at most EARLY_BUDGET of a core, with bursts of EARLY_BURST seconds of
      run time: credit accrues at EARLY_BUDGET per second and every plain run spends its
      duration. Without it a stream of channel events (every pair of a 1000-peer node
      rotating every 2 minutes is about 50 a second, and so is a peer whose agent says
      "installed" over and over) kept the agent running every 3rd moment: a quarter of
      a core. A single event after a quiet while is served at once; a sustained stream
      waits at most for the poll, which runs whatever the credit.

    Only a plain run's duration counts: a first one, a failed one or one that recovered
    from a VPP restart (a full reconcile, pods re-attached) says nothing about the next,
    and after a restart the peers' answers are what the pair waits for."""

    def __init__(self) -> None:
        self.last_end = float("-inf")  # when the last run ended (monotonic)
        self.last_seconds = 0.0  # how long the last plain run took
        self._credit = EARLY_BURST  # seconds of run time early runs may spend now
        self._credited_at: float | None = None

    def _credit_at(self, now: float) -> float:
        if self._credited_at is None:
            return self._credit
        return min(EARLY_BURST, self._credit + (now - self._credited_at) * EARLY_BUDGET)

    def ran(self, ended: float, seconds: float, *, plain: bool) -> None:
        """A run ended at `ended` (monotonic) after `seconds`; `plain`: see the class."""
        self.last_end = ended
        if plain:
            self._credit = self._credit_at(ended) - seconds
            self._credited_at = ended
            self.last_seconds = seconds

    def wait(self, now: float) -> float:
        """Seconds from `now` until an early run may come (<= 0: now)."""
        gap = self.last_end + max(EARLY_MIN_GAP, 3 * self.last_seconds) - now
        credit = self._credit_at(now)
        return max(gap, -credit / EARLY_BUDGET if credit < 0 else 0.0)


class Loop:
    """One iteration of a long-running agent, the same for a mesh file and a datastore.

    `step` is the only place where an iteration's work happens: run the session (which
    takes the mesh from its source, reconciles and re-attaches pods, and decides whether
    VPP went away or restarted: the loop is one of its hooks), count errors, fill the
    metrics and hand the result to `report`. Whatever else the agent must do on every
    iteration belongs here. `run` steps once per tick of the caller's schedule.
    """

    def __init__(self, session: node.Agent, opts: node.NodeOptions, *,
                 metrics: AgentMetrics | None = None, stats_socket: Path | None = None,
                 report: Callable[[node.UpResult], None] | None = None,
                 on_error: Callable[[Exception], None] | None = None,
                 control: Control | None = None) -> None:
        self.session = session
        self.opts = opts
        self.metrics = metrics
        self.stats_socket = stats_socket
        self.report = report
        self.on_error = on_error  # told of every failed step but VPP being away
        self.vpp_gone_at: float | None = None  # since when VPP has not answered
        self.source_gone_at: float | None = None  # since when the datastore has not answered
        self.started_at = time.monotonic()
        self.uplink_awaited = False  # said once that a VPP just met has no uplink yet
        self.early = EarlyRuns()  # when the channel's runs may come early
        self.failed = False  # the last step failed
        self.last_pid: int | None = None  # the VPP of the last step that succeeded
        self.recovered = False  # the last step programmed a VPP met again (restarted)
        self._restarted = False  # the Agent met a restarted VPP since the last success
        self.control = control  # the control socket (vppmesh rekey): told of every step
        self.last_error: str | None = None  # why the last step failed
        hooks = getattr(session, "hooks", None)  # (stand-ins that never restart have none)
        if hooks is not None:
            hooks.append(self)  # the Agent tells the loop of VPPs met and gone

    # ---- node.VppHooks: the Agent decides, the loop follows ---------------------------
    def on_vpp_met(self, api: VppApi, pid: int, *, restarted: bool,
                   view: object) -> None:
        """A VPP not met before: when it replaced one, the next step that succeeds
        recovered it (logged, counted as a restart)."""
        self._restarted |= restarted

    def on_vpp_gone(self, reason: str) -> None:
        """VPP stopped answering (told once per outage): said, its uplinks given back to
        Linux, knocking fast until it answers (poll_ticks' hurry)."""
        self.vpp_gone_at = time.monotonic()
        log.warning("VPP unavailable (%s); waiting for it", reason)
        give_back_uplinks(self.opts)
        if self.metrics is not None:
            self.metrics.vpp_up.set(0)

    def run(self, ticks: Iterable[object]) -> None:
        for _tick in ticks:
            started, first = time.monotonic(), self.last_pid is None
            result = self.step()
            ended = time.monotonic()
            self.early.ran(ended, ended - started,
                           plain=not (first or self.recovered or self.failed))
            if self.control is not None:
                self.control.stepped(result, self.session.secrecy, self.last_error)

    def early_in(self) -> float:
        """Seconds until a step the channel asks for may come, before its schedule (0:
        now): EarlyRuns."""
        return self.early.wait(time.monotonic())

    def may_run_early(self) -> bool:
        return self.early_in() <= 0

    def step(self) -> node.UpResult | None:
        """Run the session once; the result, or None if the run failed."""
        attempt = time.monotonic()
        self.failed, self.recovered = True, False
        try:
            result = self.session.run()
        except VppUnavailableError as exc:  # the Agent told on_vpp_gone
            self.last_error = f"VPP unavailable ({exc})"
            return None
        except UplinkMissingError as exc:
            # A VPP met a moment ago may answer before its uplink is configured (its
            # startup, vpp-run or the NIC's driver still at work): wait for it as for VPP
            # itself (after a restart: knocking fast), said once; only past UPLINK_WAIT
            # is it an error.
            met = self.vpp_gone_at if self.vpp_gone_at is not None else \
                self.started_at if self.last_pid is None else None
            if met is None or attempt - met > UPLINK_WAIT:
                return self._error(exc)
            self.last_error = f"VPP has no uplink yet ({exc})"
            if not self.uplink_awaited:
                self.uplink_awaited = True
                log.warning("VPP answers but has no uplink yet; waiting for it (%s)", exc)
            return None
        except SourceUnavailableError as exc:
            # etcd restarting or out of reach: VPP keeps the mesh it has. Said once, like
            # VPP away, and not counted as a failed reconcile; the step is retried.
            self.last_error = f"mesh source unavailable ({exc})"
            if self.source_gone_at is None:
                self.source_gone_at = attempt
                log.warning("%s; VPP keeps the mesh as it is, asking again", exc)
                if self.metrics is not None:
                    self.metrics.source_up.set(0)
            else:
                log.debug("%s", exc)
            self._failed(exc)
            return None
        except VppMeshError as exc:
            return self._error(exc)
        except Exception as exc:  # a bug must not stop the node from following the mesh
            self.last_error = f"unexpected error: {exc}"
            log.exception("unexpected error; trying again")
            self._failed(exc)
            return None
        self.failed = False
        self.uplink_awaited = False
        elapsed = time.monotonic() - attempt
        if self.source_gone_at is not None:
            log.info("the mesh source answers again after %.1f s",
                     attempt - self.source_gone_at)
            self.source_gone_at = None
            if self.metrics is not None:
                self.metrics.source_up.set(1)
        self.recovered = self.vpp_gone_at is not None or self._restarted
        self._restarted = False
        pods = result.pod_report
        if self.recovered:
            log.info("VPP is back (pid %s): mesh programmed again in %.0f ms after it "
                     "answered (%d change(s)); %d pod(s) re-attached in %.0f ms in all",
                     result.vpp_pid, result.seconds * 1000, len(result.changes),
                     len(pods.reattached) if pods else 0, elapsed * 1000)
        self.measured(result, elapsed, restarted=self.recovered,
                      unavailable=attempt - self.vpp_gone_at
                      if self.vpp_gone_at is not None else None)
        self.vpp_gone_at = None
        if self.report is not None:
            self.report(result)
        self.last_pid = result.vpp_pid
        return result

    def measured(self, result: node.UpResult, seconds: float, *, restarted: bool,
                 unavailable: float | None = None) -> None:
        """With metrics: the run's numbers and the channel's, and a new snapshot from VPP
        when one is due."""
        metrics = self.metrics
        if metrics is None:
            return
        metrics.record_poll(seconds, result.pod_report, restarted=restarted,
                            unavailable=unavailable)
        metrics.record_channel(self.session.secrecy)
        counters = getattr(self.session, "counters", None)  # (stand-ins have none)
        if counters is not None:
            metrics.sa_counters_unavailable.set(int(counters.unavailable is not None))
        # (a peer stopped outside the window is among the blocked too: counted once)
        metrics.record_keys(len(result.downgraded_peers),
                            len(set(result.stopped_peers) | set(result.blocked_peers)))
        client = self.session.client
        if result.mesh is not None and client is not None and \
                metrics.snapshot_due(time.monotonic()):
            try:
                secrecy = self.session.secrecy
                metrics.observe(client, result.mesh, self.opts.node, self.stats_socket,
                                self.opts.generations.load(), vpp_pid=result.vpp_pid,
                                now=secrecy.clock() if secrecy else self.opts.clock())
            except VppMeshError as exc:  # the next step finds out what happened
                log.warning("metrics snapshot failed: %s", exc)

    def _error(self, exc: VppMeshError) -> None:
        """A step that failed for a reason the operator must know: logged and counted."""
        self.last_error = str(exc)
        log.error("%s", exc)
        if self.metrics is not None:
            self.metrics.reconcile_errors.inc()
        self._failed(exc)

    def _failed(self, exc: Exception) -> None:
        if self.on_error is not None:
            self.on_error(exc)


def watch_loop(opts: node.NodeOptions, metrics: AgentMetrics | None = None,
               stats_socket: Path | None = None,
               report: Callable[[node.UpResult], None] | None = None) -> None:
    """`up --watch`: re-apply every poll and on mesh file changes (Loop).

    Every poll runs `up`, which also advances key generations (scheduled rekeys, key
    limits, receivers following their senders). A restart of VPP is noticed whether the
    agent saw VPP gone or only a new VPP process id: either way the mesh is programmed
    again under fresh keys, the CNI pods are re-attached, and the time from VPP's return
    to that is logged (and exported with --metrics). A poll that changed something or
    has notes goes to `report`.
    """
    hardening.forbid_core_dumps()  # before any key is read: see vppmesh/agent/hardening.py
    log.info("watching %s and VPP at %s", opts.mesh_file, opts.api_socket)

    reported: list[bool] = []

    def changed(result: node.UpResult) -> None:
        """The first run is reported whatever it did (it is the agent's `up`); later
        ones when they changed something or have notes."""
        if report is not None and (not reported or result.changes or result.notes):
            reported.append(True)
            report(result)

    control = open_control(opts)
    loop = agent_loop(opts, metrics=metrics, stats_socket=stats_socket, report=changed)
    loop.control = control
    secrecy = loop.session.secrecy
    assert secrecy is not None
    # SIGTERM (systemd, a container runtime, an upgrade) ends the loop between two runs:
    # a run cut short after VPP took its changes but before the generation file did
    # would make the next agent step past a key for nothing.
    # A `stop` on the control socket (`vppmesh down --stop-agent`) ends it the same way.
    stop = threading.Event()
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
    if control is not None:
        control.on_stop = stop.set
    try:
        loop.run(poll_ticks(opts.mesh_file, hurry=lambda: loop.vpp_gone_at is not None,
                            wait=control.wait(secrecy.wait) if control else secrecy.wait,
                            stop=stop, early_in=loop.early_in, vpp_socket=opts.api_socket))
        log.info("stopped (SIGTERM)")
        loop.session.close()  # sockclnt_delete: VPP closes its end (vpp_stops_within)
        leave_uplinks(opts)
    finally:
        loop.session.close()
        secrecy.close()
        if control is not None:
            control.close()


def agent_loop(opts: node.NodeOptions, *, source: node.MeshSource | None = None,
               connect: Callable[[], VppApi] | None = None,
               metrics: AgentMetrics | None = None, stats_socket: Path | None = None,
               report: Callable[[node.UpResult], None] | None = None,
               on_error: Callable[[Exception], None] | None = None) -> Loop:
    """The agent's parts, wired once for both mesh sources (the mesh file of `up --watch`,
    the datastore's membership): the agents' channel (Secrecy), the SA counters of the
    stats segment (idle runs dump no SA), the Agent that runs the pipeline and the loop
    that steps it. `source` None is the mesh file."""
    secrecy = Secrecy(channel_socket(opts), state_dir=opts.state_dir, clock=opts.clock)
    counters = SaCounters(stats_socket) if stats_socket is not None else None
    session = node.Agent(opts, source=source, connect=connect, secrecy=secrecy,
                            counters=counters)
    return Loop(session, opts, metrics=metrics, stats_socket=stats_socket,
                     report=report, on_error=on_error)


def open_control(opts: node.NodeOptions) -> Control | None:
    """The agent's control socket (vppmesh/agent/control.py); None, said once, when it cannot
    be made: the agent runs on, and `vppmesh rekey` falls back to a one-shot run."""
    from vppmesh.agent.control import Control, socket_path

    try:
        return Control(socket_path(opts), opts.generations)
    except VppMeshError as exc:
        log.warning("no control socket (`vppmesh rekey` cannot ask this agent): %s", exc)
        return None

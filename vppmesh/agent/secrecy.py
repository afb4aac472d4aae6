"""The agents' channel (vppmesh/channel/) in the agent: VPP's punt socket, the channel's
datagrams, timers and events, run by the agent loop.

A long-running agent (watch.Loop, through node.Agent) keeps one `Secrecy`. It
registers VPP's punt socket for the channel's port when the Agent meets a VPP
(on_vpp_met; again after a restart, announcing the restart to every peer), follows
the mesh's peers, and between runs services the channel: datagrams in, timers,
events. What they mean for keys is its agreement's (keying/channel_agreement.py, the
run's Agreement); what they mean for peers behind NAT is its NAT learning's (nat.py).
"""

from __future__ import annotations

import logging
import os
import select
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from vppmesh.agent.clock import AgentClock, TimestampFile, Timestamps
from vppmesh.agent.nat import NatLearning, channel_address
from vppmesh.channel import session as s
from vppmesh.channel.endpoint import PATHS, PORT, ChannelEndpoint
from vppmesh.channel.transport import PuntTransport
from vppmesh.dataplane.state import GATEWAY_TAG
from vppmesh.dataplane.vpp import interfaces, punt
from vppmesh.errors import VppMeshError
from vppmesh.keying.channel_agreement import ChannelAgreement
from vppmesh.keying.keys import psk_id, public_key_b64

if TYPE_CHECKING:
    from vppmesh.agent.node import NodeOptions
    from vppmesh.dataplane.view import LocalView
    from vppmesh.dataplane.vpp.client import Request, VppApi

log = logging.getLogger("vppmesh")

# The agent's end of VPP's punt socket, beside VPP's API socket (a directory both see).
CHANNEL_SOCKET = "vppmesh-channel.sock"
# How many datagrams a burst may queue on the agent's socket before the kernel refuses
# more (net.unix.max_dgram_qlen is 10 by default): every peer answering at once fits.
DGRAM_QUEUE = 4096
DGRAM_QLEN = Path("/proc/sys/net/unix/max_dgram_qlen")


def channel_socket(options: NodeOptions) -> Path:
    """The agent's end of VPP's punt socket: beside VPP's API socket, a directory that
    VPP and the agent share wherever they run (host, containers)."""
    return options.api_socket.parent / CHANNEL_SOCKET


def raise_dgram_queue(minimum: int = DGRAM_QUEUE) -> None:
    """Let a unix datagram socket queue `minimum` datagrams (a node-wide sysctl; only
    raised, never lowered). Best effort: without it a burst is dropped and retried."""
    try:
        if int(DGRAM_QLEN.read_text()) < minimum:
            DGRAM_QLEN.write_text(str(minimum))
    except (OSError, ValueError) as exc:
        log.debug("cannot raise %s: %s", DGRAM_QLEN, exc)


class Secrecy:
    """One agent's channel (see the module), with its NAT learning (`nat`) and its
    agreement (`agreement`: the runs' Agreement)."""

    def __init__(self, socket_path: Path, *, state_dir: Path | None = None,
                 clock: Callable[[], float] | None = None) -> None:
        """`clock`: the node's (vppmesh/agent/clock.py: NodeOptions.clock), the same as its runs'
        `now`, since what the peers said (`sending`) meets the generation file's times;
        None: a clock of this process only. `state_dir`: where the handshake timestamps'
        reservation and the peers' timestamp marks survive the agent (TimestampFile);
        None: nothing persists (a restarted agent could accept a handshake recorded
        before, and its own timestamps rest on its clock alone)."""
        self.socket_path = socket_path
        self.state_dir = state_dir
        self.clock: Callable[[], float] = clock or AgentClock(None)
        self._stamps: tuple[Timestamps, TimestampFile | None] | None = None
        self._saved_marks: dict[int, int] = {}  # the peers' timestamp marks on disk
        self.endpoint: ChannelEndpoint | None = None
        self._configs: dict[int, s.PeerConfig] = {}
        self._followed: LocalView | None = None
        self.unavailable: str | None = None  # why there is no channel (told once)
        # The PSKs held (role, id) and the static schedule's id, as last followed.
        self._psks: tuple[tuple[tuple[str, str], ...], str] | None = None
        self.nat = NatLearning(self)
        self.agreement = ChannelAgreement(self, self.nat)

    @property
    def channel(self) -> s.Channel | None:
        return self.endpoint.channel if self.endpoint is not None else None

    def fileno(self) -> int:
        assert self.endpoint is not None
        return self.endpoint.fileno()

    def live(self, peer: int) -> bool:
        """A usable session with `peer` now. Only then does its word count: a peer
        whose agent stopped drops out when its last session expires, and the static
        schedule takes over rather than wait for it forever."""
        channel = self.channel
        return channel is not None and channel.knows(peer) and \
            channel.established(peer, self.clock())

    # ---- VPP and the mesh ------------------------------------------------------------
    def on_vpp_met(self, api: VppApi, pid: int, *, restarted: bool,
                   view: LocalView) -> None:
        """node.VppHooks: a VPP not met before answers at `api` (process `pid`;
        `restarted`: another VPP was met before, so this node's peers are told). Register
        the punt socket (asked once per VPP: a refusal holds until the next one), keep
        or make the boot id, then attach."""
        boot_id = self._boot_id(pid, fresh=restarted)
        try:
            replies = api.call_many([punt.register(PORT, False, self.socket_path),
                                     punt.register(PORT, True, self.socket_path),
                                     *self._esp_flow_registrations(api)])
        except VppMeshError as exc:
            if self.unavailable is None:
                log.warning("no channel between agents (keys stay on the static "
                            "schedule, without forward secrecy): %s; VPP needs "
                            "`punt { socket ... }` in its startup.conf "
                            "(vppmesh render-startup)", exc)
            self.unavailable = str(exc)
            return
        self.unavailable = None
        vpp_socket = Path(str(replies[0].pathname))
        if self.endpoint is None or self.endpoint.transport.vpp_path != vpp_socket:
            if self.endpoint is not None:
                self.endpoint.transport.close()
            raise_dgram_queue()
            transport = PuntTransport(self.socket_path, vpp_socket)
            timestamps, marks = self._handshakes(view.name)
            channel = s.Channel(view.node.node_number, view.secrets, [],
                                boot_id=boot_id, timestamps=timestamps,
                                timestamp_marks=marks)
            self.endpoint = ChannelEndpoint(channel, transport, {})
            self._configs = {}
            self.agreement.new_channel()
            self._followed = None
        elif restarted:
            self.agreement.announce(boot_id)  # told once this VPP holds the mesh
        self.endpoint.tunnel_sw_if_index = None  # this VPP's gateway: found by attach
        self.attach(api, view)

    def on_vpp_gone(self, reason: str) -> None:
        """node.VppHooks: nothing to do; the channel's socket stays (VPP comes back)."""

    def attach(self, api: VppApi, view: LocalView) -> None:
        """Every run: the VPP's gateway loopback until it is found, the view's peers."""
        if self.endpoint is not None and self.endpoint.tunnel_sw_if_index is None:
            self.endpoint.tunnel_sw_if_index = gateway_index(api)
        self.follow(view)

    def _handshakes(self, node: str) -> tuple[Timestamps, dict[int, int]]:
        """This agent's handshake timestamps (one issuer for every channel it opens),
        starting above what an earlier agent reserved, and the peers' timestamp marks a
        new channel starts from: what the earlier agent kept, or the last channel's."""
        if self._stamps is None:
            store = TimestampFile(self.state_dir / f"{node}.handshakes.json") \
                if self.state_dir is not None else None
            issued, self._saved_marks = store.load() if store is not None else (0, {})
            reserve = (lambda up_to: store.save(up_to, self._saved_marks)) \
                if store is not None else None
            self._stamps = (Timestamps(self.clock, issued=issued, reserve=reserve), store)
        channel = self.channel
        marks = channel.timestamp_marks() if channel is not None else self._saved_marks
        return self._stamps[0], marks

    def save_marks(self, *, closing: bool = False) -> None:
        """The peers' timestamp marks, when they changed; `closing`: with the timestamp
        really issued last (the next agent starts right above it)."""
        if self._stamps is None or self._stamps[1] is None:
            return
        timestamps, store = self._stamps
        channel = self.channel
        marks = channel.timestamp_marks() if channel is not None else self._saved_marks
        if marks == self._saved_marks and not closing:
            return
        issued = timestamps.issued if closing else timestamps.reserved
        if store.save(issued, marks):
            self._saved_marks = marks
            timestamps.reserved = issued

    def _esp_flow_registrations(self, api: VppApi) -> list[Request]:
        """Punt what arrives on UDP 4500 with SPI 0 (the channel on the ESP flow) to
        the agent, where VPP knows those reasons."""
        reasons = punt.reason_ids(api)
        missing = [n for n in punt.SPI_UDP_0.values() if n not in reasons]
        if missing:
            log.warning("VPP has no punt reason %s: the channel does not cross NATs on "
                        "the ESP flow (no port learning)", ", ".join(missing))
        return [punt.register_exception(reasons[n], n, self.socket_path)
                for n in punt.SPI_UDP_0.values() if n in reasons]

    def _boot_id(self, vpp_pid: int, *, fresh: bool) -> int:
        """The id peers know this node's VPP by: new for a VPP this agent saw start,
        kept across agent restarts while the VPP runs (a file beside the socket, on the
        runtime directory), so a restarted agent is not taken for a restarted VPP."""
        path = self.socket_path.with_suffix(".boot")
        if not fresh:
            try:
                pid, boot = path.read_text().split()
                if int(pid) == vpp_pid:
                    return int(boot)
            except (OSError, ValueError):
                pass
        boot_id = int.from_bytes(os.urandom(8), "big")
        try:
            path.write_text(f"{vpp_pid} {boot_id}\n")
        except OSError as exc:
            log.debug("cannot keep the boot id in %s: %s", path, exc)
        return boot_id

    def follow(self, view: LocalView) -> None:
        """The view's peers and this node's addresses, when they changed."""
        endpoint = self.endpoint
        if endpoint is None:
            return
        if view is self._followed:
            return  # the mesh is unchanged (a Agent keeps its view while it is)
        self._follow_psks(view)
        self._follow_own_keys(view)
        endpoint.channel.set_secrets(view.secrets)
        self._followed = view
        endpoint.local = {version: (address, PORT)
                          for version, address in local_addresses(view).items()}
        # Keepalives only where a middlebox keeps state for the pair's flow: ESP in UDP
        # (a NAT, or a node that asked for UDP); elsewhere an idle pair is silent between
        # rekeys, and its sessions still expire by age.
        configs = {p.node.node_number: s.PeerConfig(
            p.node.node_number, p.node.public_key_bytes, channel_address(p),
            keepalive=p.path.udp_encap) for p in view.peers}
        endpoint.channel.set_peers(configs.values())
        endpoint.esp_flow = frozenset(str(p.path.endpoints[0][1]) for p in view.peers
                                      if p.path.udp_encap)
        endpoint.tunnel_source = str(view.node.channel_address)
        endpoint.tunnel_peers = {p.node.node_number: str(p.node.channel_address)
                                 for p in view.peers}
        self.nat.follow(view)
        # A peer that left, or whose record changed, starts afresh on both ends.
        for number in [n for n, c in self._configs.items() if configs.get(n) != c]:
            self.agreement.forget_peer(number, gone=number not in configs)
        self._configs = configs

    def _follow_own_keys(self, view: LocalView) -> None:
        """Say what a step of this node's key rotation changed (public keys only)."""
        channel = self.channel
        if channel is None:
            return
        held = tuple(public_key_b64(key) for _role, key in view.secrets.private_keys())
        before = tuple(public_key_b64(key) for _role, key in channel.secrets.private_keys())
        if held == before:
            return
        log.info("private keys held now: %s; the channel answers handshakes to each",
                 ", ".join(f"{role} {public_key_b64(key)}"
                           for role, key in view.secrets.private_keys()))
        now = self.clock()
        names = {p.node.node_number: p.name for p in view.peers}
        stranded = sorted(names.get(n, str(n)) for n in channel.peers()
                          if channel.session_key(n, now) == "previous" and len(held) == 1)
        if stranded:
            log.warning("the previous key was removed while %s still knew this node by it: "
                        "their channel ends (their handshakes fail the pair MAC) until their "
                        "mesh file names the new key", ", ".join(stranded))

    def _follow_psks(self, view: LocalView) -> None:
        """Say what a PSK rotation step changed (never the PSKs themselves: their ids)."""
        held = tuple((role, psk_id(psk)) for role, psk in view.secrets.psks())
        static = psk_id(view.secrets.static_psk)
        before, self._psks = self._psks, (held, static)
        if before is None or before == self._psks:
            return
        log.info("PSKs held now: %s; the channel accepts handshakes under each and "
                 "initiates under the current one", ", ".join(f"{r} {i}" for r, i in held))
        if before[1] != static:
            log.warning(
                "the static key schedule moved to PSK %s (was %s): a pair on static keys "
                "(its agents have not met, or `forward_secrecy: preferred` fell back) with "
                "a node that has not made the same step fails closed (its ESP does not "
                "authenticate) until it has; pairs on agreed keys are not affected",
                static, before[1])

    def close(self) -> None:
        self.save_marks(closing=True)
        if self.endpoint is not None:
            self.endpoint.transport.close()
        self.endpoint = None

    # ---- between runs --------------------------------------------------------------
    def wait(self, timeout: float) -> bool:
        """Wait up to `timeout` for the channel, less when one of its timers is due
        sooner; True when a run should follow now."""
        if self.endpoint is None:
            time.sleep(timeout)
            return False
        now = self.clock()
        due = self.endpoint.channel.next_due()
        if due is not None:
            timeout = max(0.0, min(timeout, due - now))
        readable, _, _ = select.select([self], [], [], timeout)
        return self.service(receive=bool(readable))

    def service(self, *, receive: bool = True) -> bool:
        """Datagrams in, timers, events; True when one of them needs a run."""
        endpoint = self.endpoint
        if endpoint is None:
            return False
        now = self.clock()
        events = endpoint.receive(now) if receive else []
        events += endpoint.tick(now)
        self.nat.keepalives(now)
        wanted = False
        for event in events:
            wanted |= self._event(now, event)
        return wanted

    def _event(self, now: float, event: s.Event) -> bool:
        match event:
            case s.HandshakeComplete(peer=peer):
                self.nat.handshake_complete(now)
                self.agreement.session_made(now, peer)
                # No run for it: sessions rekey every 2 minutes (8 a second at 1000
                # peers); a pair on static keys moves to agreed ones at the next poll.
                return False
            case s.EndpointChanged(peer=peer, endpoint=(host, port)):
                return self.agreement.learned(self.nat.learn(peer, host, port))
            case s.FlowSeen(peer=peer, tunnel=tunnel, source=(host, port)):
                return self.agreement.learned(self.nat.learn(peer, host, port, tunnel))
        return self.agreement.heard(now, event)

    # ---- reporting -------------------------------------------------------------------
    def counters(self) -> dict[str, int]:
        """The channel's counters: drops by reason and its stats (metrics, status)."""
        endpoint = self.endpoint
        if endpoint is None:
            return {}
        found = {f"drop_{reason}": count for reason, count in endpoint.drops().items()}
        found.update(endpoint.channel.stats)
        found["sent_datagrams"] = endpoint.transport.sent
        found["received_datagrams"] = endpoint.transport.received
        found["send_errors"] = endpoint.transport.send_errors
        found["nat_keepalives"] = endpoint.transport.keepalives
        for path in PATHS:
            found[f"path_{path}"] = endpoint.path_datagrams[path]
        found["nat_probes"] = self.nat.probes
        return found


def local_addresses(view: LocalView) -> dict[int, str]:
    """This node's primary underlay address per IP version (the channel's source)."""
    found: dict[int, str] = {}
    for address in view.node.underlay:
        found.setdefault(address.ip.version, str(address.ip))
    return found


def gateway_index(api: VppApi) -> int | None:
    """The sw_if_index of VPP's gateway loopback (in the mesh VRF; None: not made yet):
    channel datagrams routed from it go through the tunnels (channel/endpoint.py)."""
    found = next((i for i in interfaces.dump_interfaces(api) if i.tag == GATEWAY_TAG), None)
    return found.sw_if_index if found is not None else None

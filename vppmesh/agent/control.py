"""The running agent's control socket: `vppmesh rekey` asks the agent, not the VPP.

Why a socket of its own. A pair on agreed keys can only be rekeyed by its two agents,
over their channel (secrecy.py): a one-shot `rekey` has no channel and, rightly, never
steps such a pair onto a static key, so with the agents running it could only leave a
request in the generation file and hope. The operator's emergency lever after a
suspected compromise must say what it did: so the command asks the local agent, which
marks every peer for a rekey, runs at once, and answers once every peer's outbound
generation moved past the one it had and the peer acknowledged it (its inbound SAs for
the new generation are installed and we send on it), or at the request's timeout with,
per peer, why not.

The socket is beside the channel's (VPP's API socket directory, secrecy.channel_socket),
created 0600 under a 077 umask (no window in which another user could connect), and
every connection's peer credentials (SO_PEERCRED) must be root's: a local user who could
rekey at will could make the agents spend generations and handshakes.

The protocol is one JSON object per line, one request per connection, one answer:

    -> {"request": "rekey", "timeout": 30}
    <- {"ok": true, "seconds": 1.2, "peers": [{"peer": "n1", "from": 3, "to": 4,
        "moved": true, "agreed": true, "reason": null}, ...]}
    <- {"ok": false, "error": "..."}            (a request that could not be taken)

`ok` is false when a peer did not move in time; its `reason` says why (deferred by the
reserve rule, waiting for the peer's agent, no session...) and the request stays
marked, so the agent moves the peer as soon as it may.

Two more requests let `vppmesh down` and `vppmesh uninstall` find and stop the agent that
would otherwise put back what they remove at its next poll:

    -> {"request": "ping"}
    <- {"ok": true, "pid": 1234}                (an agent of this VPP runs: that process)
    -> {"request": "stop"}
    <- {"ok": true, "stopped": true, "pid": 1234}

`stop` ends the agent's loop between two runs, as SIGTERM does; its answer comes once the
loop ended and the socket is being closed, so the client knows the agent is done.

The agent's loop is single-threaded (watch.Loop): `service()` does the socket's
work without blocking (non-blocking accept and reads, answers of a few kilobytes) and is
called from the loop's waits between runs; `stepped()` after every run checks the open
requests.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import select
import socket
import struct
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vppmesh.errors import VppMeshError
from vppmesh.keying.epochs import WINDOW, GenerationStore, request_rekey

if TYPE_CHECKING:
    from vppmesh.agent.node import NodeOptions, UpResult
    from vppmesh.agent.secrecy import Secrecy

log = logging.getLogger("vppmesh")

CONTROL_SOCKET = "vppmesh-control.sock"
MAX_LINE = 4096  # a request is a few dozen bytes
MAX_CONNECTIONS = 16  # open connections (requests included); more are refused
READ_SECONDS = 5.0  # a connection must send its request within this
SEND_SECONDS = 2.0  # an answer the client does not read is dropped after this
DEFAULT_TIMEOUT = 30.0
MAX_TIMEOUT = 600.0
ROOT = frozenset({0})
_CRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


def socket_path(options: NodeOptions) -> Path:
    """Beside the channel's socket: VPP's API socket directory (root's)."""
    return options.api_socket.parent / CONTROL_SOCKET


@dataclass
class PeerOutcome:
    peer: str
    start: int
    now: int
    agreed: bool = False
    reason: str | None = None

    @property
    def moved(self) -> bool:
        return self.now > self.start

    def answer(self) -> dict[str, Any]:
        return {"peer": self.peer, "from": self.start, "to": self.now, "moved": self.moved,
                "agreed": self.agreed, "reason": None if self.moved else self.reason}


@dataclass
class _Connection:
    sock: socket.socket
    opened: float
    buffer: bytes = b""


@dataclass
class _Rekey:
    """One open rekey request: the generation each peer sent on when it came."""

    conn: _Connection
    started: float
    deadline: float
    start: dict[str, int]
    outcomes: dict[str, PeerOutcome] = field(default_factory=dict)


class Control:
    """The agent's control socket and its open rekey requests (see the module)."""

    def __init__(self, path: Path, store: GenerationStore, *,
                 uids: Collection[int] = ROOT,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.path = path
        self.store = store
        self.uids = frozenset(uids)
        self.clock = clock
        # Ends the agent's loop (a `stop` request); the loop that owns the socket sets it.
        self.on_stop: Callable[[], None] | None = None
        self._connections: list[_Connection] = []
        self._rekeys: list[_Rekey] = []
        self._stops: list[_Connection] = []  # answered at close(): the loop has ended
        self.sock = _listen(path)

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        self.sock.close()
        try:
            if self.path.is_socket():
                self.path.unlink()
        except OSError:
            pass
        # Answered once nobody can connect any more: whoever asked the agent to stop
        # finds no agent from then on.
        for conn in list(self._stops):
            self._answer(conn, {"ok": True, "stopped": True, "pid": os.getpid()})
        for conn in self._connections:
            conn.sock.close()
        self._connections, self._rekeys, self._stops = [], [], []

    def wait(self, inner: Callable[[float], bool]) -> Callable[[float], bool]:
        """`inner` (the channel's wait: watch.poll_ticks) with this socket serviced before
        and after; True when a run is wanted now (a rekey came)."""
        def waiting(timeout: float) -> bool:
            wanted = self.service()
            wanted |= inner(timeout)
            return self.service() or wanted
        return waiting

    # ---- the socket ------------------------------------------------------------------
    def service(self) -> bool:
        """Accept, read and take what is waiting, answer what timed out; never blocks.
        True when a rekey request was taken (a run should follow now)."""
        now = self.clock()
        self._accept(now)
        wanted = False
        for conn in list(self._connections):
            if any(r.conn is conn for r in self._rekeys) or conn in self._stops:
                continue
            line = self._read(conn, now)
            if line is not None:
                wanted |= self._take(conn, line, now)
        for rekey in [r for r in self._rekeys if now >= r.deadline]:
            self._finish(rekey, now)
        return wanted

    def _accept(self, now: float) -> None:
        while True:
            try:
                sock, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE and the like: the next service tries again
                log.warning("control socket: %s", exc)
                return
            conn = _Connection(sock, now)
            uid = _peer_uid(sock)
            if uid not in self.uids:
                log.warning("control socket: refused a connection from uid %s (root only)",
                            uid)
                self._answer(conn, {"ok": False, "error": "refused: the agent's control "
                                    "socket is root's only (run vppmesh as root)"})
                continue
            if len(self._connections) >= MAX_CONNECTIONS:
                self._answer(conn, {"ok": False, "error": "busy: too many open requests; "
                                    "try again when they are answered"})
                continue
            sock.setblocking(False)
            self._connections.append(conn)

    def _read(self, conn: _Connection, now: float) -> bytes | None:
        """The request line once complete; None while it is not (or after an error)."""
        while True:
            try:
                data = conn.sock.recv(MAX_LINE + 1)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                self._drop(conn)
                return None
            if not data:  # the client went away (or sent no newline)
                if conn.buffer.strip():
                    return conn.buffer
                self._drop(conn)
                return None
            conn.buffer += data
            if b"\n" in conn.buffer:
                return conn.buffer.split(b"\n", 1)[0]
            if len(conn.buffer) > MAX_LINE:
                self._answer(conn, {"ok": False, "error": f"request longer than {MAX_LINE} "
                                    "bytes: send one JSON object on one line"})
                return None
        if now - conn.opened >= READ_SECONDS:
            self._answer(conn, {"ok": False, "error": f"no request within {READ_SECONDS:g} s"})
        return None

    def _take(self, conn: _Connection, line: bytes, now: float) -> bool:
        try:
            request = json.loads(line)
        except (ValueError, UnicodeDecodeError):
            self._answer(conn, {"ok": False, "error": 'not JSON: send one object such as '
                                '{"request": "rekey", "timeout": 30} on one line'})
            return False
        what = request.get("request") if isinstance(request, dict) else None
        if what == "ping":
            self._answer(conn, {"ok": True, "pid": os.getpid()})
            return False
        if what == "stop":
            return self._stop(conn)
        if what != "rekey":
            self._answer(conn, {"ok": False, "error": f"request: unknown {what!r}; the "
                                'agent answers "rekey", "ping" and "stop"'})
            return False
        timeout = request.get("timeout", DEFAULT_TIMEOUT)
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or \
                not 0 < timeout <= MAX_TIMEOUT:
            self._answer(conn, {"ok": False, "error": f"timeout: {timeout!r} is not a number "
                                f"of seconds in (0, {MAX_TIMEOUT:g}]"})
            return False
        try:
            start = self.mark()
        except VppMeshError as exc:
            self._answer(conn, {"ok": False, "error": str(exc)})
            return False
        log.info("rekey requested on the control socket: %d peer(s)", len(start))
        self._rekeys.append(_Rekey(conn, now, now + float(timeout), start))
        return True

    def _stop(self, conn: _Connection) -> bool:
        """End the agent's loop (the answer waits for close()); True: wake the loop."""
        if self.on_stop is None:
            self._answer(conn, {"ok": False, "error": "this agent cannot be stopped over its "
                                "control socket; stop it as it was started (SIGTERM)"})
            return False
        log.info("stop requested on the control socket: the agent ends after this run")
        self._stops.append(conn)
        self.on_stop()
        return True

    def mark(self) -> dict[str, int]:
        """Mark every peer for a rekey in the generation file (so the request survives a
        failed run); the generation each one sends on now."""
        with self.store.locked():
            state = self.store.load()
            request_rekey(state)
            self.store.save(state)
        return {name: pg.out for name, pg in state.peers.items()}

    # ---- after a run -----------------------------------------------------------------
    def stepped(self, result: UpResult | None, secrecy: Secrecy | None,
                error: str | None = None) -> None:
        """After a run (`result` None: it failed, `error` says why): answer the requests
        whose every peer moved, note per peer why not for the others."""
        if not self._rekeys:
            return
        now = self.clock()
        try:
            state = self.store.load()
        except VppMeshError as exc:
            error = str(exc)
            state = None
        for rekey in list(self._rekeys):
            if result is None or state is None:
                for outcome in rekey.outcomes.values():
                    if not outcome.moved:
                        outcome.reason = f"the agent's run failed: {error or 'unknown'}"
                continue
            peers = list(result.secrecy) if result.mesh is not None else []
            rekey.outcomes = {}
            for name in peers:
                pg = state.peers.get(name)
                start = rekey.start.get(name)
                if pg is None or start is None:
                    continue  # joined after the request: nothing to move away from
                outcome = PeerOutcome(name, start, pg.out, agreed=pg.out in pg.ephemeral_out)
                if not outcome.moved:
                    outcome.reason = why_not(name, pg.out, pg.floor, result, secrecy)
                rekey.outcomes[name] = outcome
            if all(o.moved for o in rekey.outcomes.values()):
                self._finish(rekey, now)

    def _finish(self, rekey: _Rekey, now: float) -> None:
        self._rekeys.remove(rekey)
        outcomes = list(rekey.outcomes.values())
        if not outcomes:  # no run completed since the request
            outcomes = [PeerOutcome(name, g, g, reason="no run of the agent completed "
                                    "(is VPP up?)") for name, g in sorted(rekey.start.items())]
        ok = all(o.moved for o in outcomes)
        self._answer(rekey.conn, {"ok": ok, "seconds": round(now - rekey.started, 3),
                                  "peers": [o.answer() for o in outcomes]})

    def _answer(self, conn: _Connection, answer: dict[str, Any]) -> None:
        try:
            conn.sock.settimeout(SEND_SECONDS)
            conn.sock.sendall(json.dumps(answer).encode() + b"\n")
            # Unread bytes at close would reset the connection before the client read
            # the answer (an oversized request): read them away, a bounded amount.
            conn.sock.setblocking(False)
            for _ in range(16):
                if not conn.sock.recv(MAX_LINE):
                    break
        except OSError as exc:
            if not isinstance(exc, BlockingIOError):
                log.debug("control socket: answer not delivered: %s", exc)
        self._drop(conn)

    def _drop(self, conn: _Connection) -> None:
        conn.sock.close()
        if conn in self._connections:
            self._connections.remove(conn)


def why_not(name: str, out: int, floor: int, result: UpResult,
            secrecy: Secrecy | None) -> str:
    """Why a peer's outbound generation has not moved yet (as of the last run)."""
    if name in result.blocked_peers:
        return "fail closed: no usable outbound key towards it"
    if name in result.waiting_peers:
        return "waiting for the peer's agent: the key in use is lost, the next is not agreed yet"
    channel = secrecy.channel if secrecy is not None else None
    number = result.mesh.node(name).node_number if result.mesh is not None else None
    if channel is None or number is None or not channel.knows(number) or \
            not channel.established(number, secrecy.clock()):  # type: ignore[union-attr]
        return "no session with the peer's agent (is it running? is UDP 4501 open?)"
    if out + 1 > floor + WINDOW - 2:
        return (f"deferred: the peer has not yet said it moved to generation {out} (one "
                "generation stays in reserve); it does so rekey_grace after we send on it")
    if channel.offering(number, out + 1):
        return f"waiting for the peer's agent to answer the offer of generation {out + 1}"
    return f"waiting for the peer's agent to install generation {out + 1}"


def _listen(path: Path) -> socket.socket:
    """A listening unix socket at `path`, 0600 from its creation; a stale file from an
    earlier agent is replaced, a live one (another agent answers) is not."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError:
        pass
    else:
        raise VppMeshError(f"{path}: another agent of this node answers there; stop it "
                           "(one agent per node)")
    finally:
        probe.close()
    path.unlink(missing_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    umask = os.umask(0o077)
    try:
        sock.bind(str(path))
        os.chmod(path, 0o600)
        sock.listen(MAX_CONNECTIONS)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise VppMeshError(f"{path}: cannot make the control socket ({exc})") from None
    finally:
        os.umask(umask)
    return sock


def _peer_uid(sock: socket.socket) -> int | None:
    try:
        _, uid, _ = _CRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                 _CRED.size))
    except OSError:
        return None
    return int(uid)


# ---- the client (`vppmesh rekey`) ----------------------------------------------------------
class NoAgent(Exception):
    """Nobody answers on the control socket: no agent runs (or an older one)."""


class NotAllowed(VppMeshError):
    """The socket's permissions refuse us (not root): whether an agent runs is unknown."""


def request(path: Path, message: dict[str, Any], wait: float) -> dict[str, Any]:
    """Send one request, wait up to `wait` seconds for its answer. NoAgent when nothing
    listens; VppMeshError when the socket refuses us or the answer does not come."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    data = b""
    try:
        try:
            sock.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise NoAgent(str(exc)) from None
        except PermissionError:
            raise NotAllowed(f"{path}: permission denied; the agent's control socket is "
                               "root's only (run vppmesh as root)") from None
        sock.sendall(json.dumps(message).encode() + b"\n")
        deadline = time.monotonic() + wait
        while b"\n" not in data:
            left = deadline - time.monotonic()
            if left <= 0:
                raise VppMeshError(f"{path}: no answer from the agent within {wait:g} s")
            readable, _, _ = select.select([sock], [], [], left)
            if not readable:
                continue
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    except OSError as exc:
        if exc.errno == errno.ECONNRESET and not data:
            raise VppMeshError(f"{path}: the agent closed the connection") from None
        raise VppMeshError(f"{path}: {exc}") from None
    finally:
        sock.close()
    try:
        answer = json.loads(data)
    except ValueError:
        raise VppMeshError(f"{path}: the agent's answer is not JSON: {data[:200]!r}") from None
    if not isinstance(answer, dict):
        raise VppMeshError(f"{path}: the agent's answer is not an object: {data[:200]!r}")
    return answer

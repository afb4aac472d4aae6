"""One connection to VPP's binary API, with every reply's retval checked.

The feature modules (ipip, ipsec, routes, ...) build `Request`s; this client sends them.
`call_many` pipelines a whole batch (see vppmesh/dataplane/vpp/channel.py): it writes requests back
to back and then checks every reply, so a reconcile of thousands of objects costs a few
socket round trips instead of one per message. Callers keep dependency order by batching
per phase: a phase's replies are all in and checked before the next phase is sent.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from vppmesh.dataplane.vpp import compat
from vppmesh.dataplane.vpp.channel import ApiChannel, EncodeError, UnknownMessageError
from vppmesh.errors import VppApiError, VppUnavailableError

log = logging.getLogger("vppmesh")
DEFAULT_API_SOCKET = Path("/run/vpp/api.sock")
CLIENT_NAME = "vppmesh"


@dataclass(frozen=True)
class Request:
    """One API message: its name and arguments. `what` names the object for errors."""

    name: str
    args: dict[str, Any] = field(default_factory=dict)
    what: str = ""
    # retvals that mean "already in the wanted state" for this request (e.g. a delete of
    # something that is gone); they are not errors.
    tolerate: tuple[int, ...] = ()

    def __repr__(self) -> str:  # requests may carry keys: show only the name and target
        return f"Request({self.name}, {self.what or '-'})"


class VppApi(Protocol):
    """What the controller needs from VPP; the real client and the unit-test fake share it."""

    def call(self, request: Request) -> Any: ...

    def call_many(self, requests: Sequence[Request]) -> list[Any]: ...

    def dump(self, name: str, **args: Any) -> list[Any]: ...

    @property
    def messages_sent(self) -> int: ...


def check_reply(request: Request, reply: Any) -> Any:
    retval = getattr(reply, "retval", 0)
    if retval != 0 and retval not in request.tolerate:
        raise VppApiError(request.name, retval, request.what)
    return reply


def check_replies(requests: Sequence[Request], replies: Sequence[Any]) -> list[Any]:
    """Check a whole batch; the error names the first failed object and counts the rest.

    Every reply is looked at before raising, so the caller knows the batch is over and
    nothing of it is still in flight when it decides what to do next.
    """
    failed = [(r, reply) for r, reply in zip(requests, replies, strict=True)
              if getattr(reply, "retval", 0) != 0 and reply.retval not in r.tolerate]
    if failed:
        request, reply = failed[0]
        detail = request.what
        if len(failed) > 1:
            others = ", ".join(r.what or r.name for r, _ in failed[1:4])
            more = "" if len(failed) <= 4 else ", ..."
            detail += f" (and {len(failed) - 1} more in the same batch: {others}{more})"
        raise VppApiError(request.name, reply.retval, detail)
    return list(replies)


class VppClient:
    """A client bound to one API socket, pipelining batches over one connection.

    One lock serialises callers, so a client may be shared between threads. Requests may
    carry SA keys: no error, log line or repr made here contains request arguments.
    """

    def __init__(self, socket_path: Path = DEFAULT_API_SOCKET, *, timeout: float = 10.0,
                 name: str = CLIENT_NAME, window: int | None = None) -> None:
        self.socket_path = socket_path
        self.vpp_version: str | None = None
        self.timeout = timeout
        self.name = name
        self._lock = threading.Lock()
        self._channel: ApiChannel | None = None
        self._window = window
        self._sent_before = 0
        self._received_before = 0

    @property
    def messages_sent(self) -> int:
        """API requests written (a dump counts once), over every connection of this client."""
        return self._sent_before + (self._channel.sent if self._channel else 0)

    @property
    def messages_received(self) -> int:
        """Replies and dump details read."""
        return self._received_before + (self._channel.received if self._channel else 0)

    def connect(self) -> VppClient:
        if not self.socket_path.exists():
            raise VppUnavailableError(
                f"no VPP API socket at {self.socket_path}: is VPP running? (start it, or pass "
                "--api-socket with the socket of the `socksvr` section of its startup.conf)"
            )
        channel = ApiChannel(self.socket_path, self.timeout)
        try:
            channel.open(f"{self.name}-{os.getpid()}")
        except VppUnavailableError:
            channel.close()
            raise
        except Exception as exc:  # connect, handshake or definitions: all mean "no VPP"
            channel.close()
            raise VppUnavailableError(
                f"cannot connect to VPP at {self.socket_path}: {exc}") from None
        self._channel = channel
        try:
            self._check_compat(channel)
        except BaseException:
            self.close()
            raise
        return self

    def _check_compat(self, channel: ApiChannel) -> None:
        """Refuse an untested VPP release or changed messages (vppmesh/dataplane/vpp/compat.py):
        one round trip, the rest comes from the handshake."""
        version = str(channel.exchange([("show_version", {})])[0].version)
        warning = compat.check_version(version)
        if warning:
            log.warning("%s", warning)
        compat.check_messages(compat.message_crcs(channel.message_table), version)
        self.vpp_version = version

    def close(self) -> None:
        channel, self._channel = self._channel, None
        if channel is not None:
            self._sent_before += channel.sent
            self._received_before += channel.received
            channel.close()

    def __enter__(self) -> VppClient:
        return self.connect() if self._channel is None else self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _connected(self) -> ApiChannel:
        if self._channel is None or not self._channel.connected:
            raise VppUnavailableError("not connected to VPP")
        return self._channel

    def _exchange(self, requests: Sequence[Request]) -> list[Any]:
        channel = self._connected()
        batch = [(r.name, r.args) for r in requests]
        with self._lock:
            try:
                if self._window is None:
                    return channel.exchange(batch)
                return channel.exchange(batch, self._window)
            except UnknownMessageError as exc:
                raise VppApiError(str(exc.args[0]), -1, "this VPP does not know the message: "
                                  "is the plugin that provides it loaded?") from None
            except EncodeError as exc:
                # Only the failing message's name and target: its arguments may hold keys.
                bad = requests[exc.position]
                raise VppApiError(bad.name, -1, f"{bad.what}: the request could not be "
                                  f"encoded ({exc.reason})") from None

    def call(self, request: Request) -> Any:
        return check_reply(request, self._exchange([request])[0])

    def call_many(self, requests: Sequence[Request]) -> list[Any]:
        """Send a batch pipelined; replies come back in request order, each checked.

        Every request of the batch reaches VPP even when an earlier one fails (VPP handles
        them in order); the first failure is raised once all replies are in.
        """
        if not requests:
            return []
        return check_replies(requests, self._exchange(requests))

    def dump(self, name: str, **args: Any) -> list[Any]:
        channel = self._connected()
        with self._lock:
            try:
                reply, details = channel.dump(name, args)
            except UnknownMessageError:
                raise VppApiError(name, -1, "this VPP does not know the message: is the "
                                  "plugin that provides it loaded?") from None
            except EncodeError as exc:
                raise VppApiError(name, -1, f"the dump could not be encoded ({exc.reason})"
                                  ) from None
        # Newer "_get" style services close the stream with a reply that has a retval.
        if reply is not None:
            check_reply(Request(name), reply)
        return details

    def cli(self, command: str) -> str:
        """Run a debug CLI command (used for status views VPP has no message for)."""
        reply = self.call(Request("cli_inband", {"cmd": command}, what=command))
        return str(reply.reply)


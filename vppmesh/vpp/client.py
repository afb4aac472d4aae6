"""One connection to VPP's binary API, with every reply's retval checked.

The feature modules (ipip, ipsec, routes, ...) build `Request`s; this client sends them.
`call_many` writes a whole batch before reading the replies, so a reconcile of thousands
of objects costs a few socket round trips instead of one per message.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from vpp_papi.vpp_papi import VPPApiError, VPPIOError, VPPValueError

from vppmesh.errors import VppApiError, VppUnavailableError

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


class VppClient:
    """A vpp-papi client bound to one API socket.

    vpp-papi is not thread-safe, so every call holds a lock. Its own debug logging prints
    message arguments (SA keys among them), so its logger is kept at WARNING whatever the
    application's log level is.
    """

    def __init__(self, socket_path: Path = DEFAULT_API_SOCKET, *, timeout: float = 10.0,
                 name: str = CLIENT_NAME) -> None:
        self.socket_path = socket_path
        self.timeout = timeout
        self.name = name
        self._lock = threading.Lock()
        self._sent = 0
        self._vpp: Any = None

    @property
    def messages_sent(self) -> int:
        return self._sent

    def connect(self) -> VppClient:
        from vpp_papi import VPPApiClient  # imported late: it is slow to import

        if not self.socket_path.exists():
            raise VppUnavailableError(
                f"no VPP API socket at {self.socket_path}: is VPP running? (start it, or pass "
                "--api-socket with the socket of the `socksvr` section of its startup.conf)"
            )
        papi_logger = logging.getLogger("vppmesh.papi")
        papi_logger.setLevel(logging.WARNING)
        vpp = VPPApiClient(
            server_address=str(self.socket_path), bootstrapapi=True, logger=papi_logger,
            read_timeout=self.timeout, use_socket=True,
        )
        try:
            rv = vpp.connect(f"{self.name}-{os.getpid()}")
        except Exception as exc:  # vpp-papi raises many unrelated types here
            raise VppUnavailableError(
                f"cannot connect to VPP at {self.socket_path}: {exc}") from None
        if rv != 0:
            raise VppUnavailableError(f"VPP at {self.socket_path} refused the connection ({rv})")
        self._vpp = vpp
        return self

    def close(self) -> None:
        if self._vpp is not None:
            try:
                self._vpp.disconnect()
            finally:
                self._vpp = None

    def __enter__(self) -> VppClient:
        return self.connect() if self._vpp is None else self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _function(self, name: str) -> Any:
        if self._vpp is None:
            raise VppUnavailableError("not connected to VPP")
        try:
            return getattr(self._vpp.api, name)
        except AttributeError:
            raise VppApiError(name, -1, "this VPP does not know the message: is the plugin "
                              "that provides it loaded?") from None

    def call(self, request: Request) -> Any:
        function = self._function(request.name)
        with self._lock:
            try:
                reply = function(**request.args)
            except (OSError, TimeoutError, VPPIOError) as exc:
                raise VppUnavailableError(
                    f"VPP stopped answering ({request.name}: {exc})") from None
            except (VPPValueError, VPPApiError, TypeError, ValueError, KeyError) as exc:
                # vpp-papi's message repeats every argument, keys included: keep only
                # the type of the problem.
                raise VppApiError(request.name, -1, f"{request.what}: the request could "
                                  f"not be encoded ({type(exc).__name__})") from None
            self._sent += 1
        return check_reply(request, reply)

    def call_many(self, requests: Sequence[Request]) -> list[Any]:
        """Send a batch; replies come back in request order, each checked."""
        return [self.call(request) for request in requests]

    def dump(self, name: str, **args: Any) -> list[Any]:
        function = self._function(name)
        with self._lock:
            try:
                result = function(**args)
            except (OSError, TimeoutError) as exc:
                raise VppUnavailableError(f"VPP stopped answering ({name}: {exc})") from None
            self._sent += 1
        # Newer "_get" style services answer (reply, details); plain dumps answer details.
        if isinstance(result, tuple) and len(result) == 2 and isinstance(result[1], list):
            check_reply(Request(name), result[0])
            return result[1]
        return list(result)

    def cli(self, command: str) -> str:
        """Run a debug CLI command (used for status views VPP has no message for)."""
        reply = self.call(Request("cli_inband", {"cmd": command}, what=command))
        return str(reply.reply)


def chunks(items: Iterable[Request], size: int) -> Iterable[list[Request]]:
    batch: list[Request] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch

"""A pipelined connection to VPP's binary API socket.

vpp-papi's synchronous client waits for each reply before it sends the next request and
hands every reply through a reader thread and a multiprocessing queue; that caps it near
2,000 messages/s, and a dump of 2,000 SAs takes most of a second. VPP itself handles one
socket's messages strictly in order and never blocks on its output, so requests can be
written back to back: this channel frames and encodes them with vpp-papi's own message
definitions (loaded from VPP at connect, exactly as vpp-papi does), keeps a window of
requests in flight, and reads the replies straight off the socket.
"""

from __future__ import annotations

import importlib.resources
import select
import socket
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vpp_papi.vpp_papi import VPPApiJSONFiles

from vppmesh.dataplane.vpp.decoder import compile_decoder
from vppmesh.dataplane.vpp.encoder import compile_encoder
from vppmesh.errors import VppUnavailableError

FRAME = struct.Struct(">QII")  # VPP's socket framing: queue, length, timestamp
MSG_ID = struct.Struct(">H")
SOCKCLNT_CREATE_ID = 15  # fixed by VPP: the only message usable before the handshake
SOCKCLNT_CREATE_REPLY_ID = 16
HANDSHAKE_CONTEXT = 124
RECV_BYTES = 1 << 18
# Requests in flight at once: enough to keep VPP busy while replies are read, small
# enough that neither side buffers megabytes.
DEFAULT_WINDOW = 1024
_UNCOMPILED = object()


class UnknownMessageError(KeyError):
    """This VPP has no such message (its plugin is not loaded, or the CRC differs)."""


class EncodeError(ValueError):
    """A request's arguments do not fit its message definition (`position` in its batch).

    The reason names only the kind of problem: vpp-papi's own messages repeat every
    argument, SA keys among them.
    """

    def __init__(self, reason: str, position: int = 0) -> None:
        super().__init__(reason)
        self.reason = reason
        self.position = position


@dataclass(frozen=True)
class MessageType:
    name: str
    msg_id: int
    definition: Any  # vpp_papi VPPMessage
    # Old-style dumps end with a control_ping_reply; newer services name their reply.
    stream: bool
    reply_ends_stream: bool
    end_of_stream: str
    encoder: Any  # compiled (encoder.py), or None: vpp-papi's pack


class ApiChannel:
    """One socket connection: handshake, message table, pipelined exchange, dumps."""

    def __init__(self, socket_path: Path, timeout: float) -> None:
        self.socket_path = socket_path
        self.timeout = timeout
        self._sock: socket.socket | None = None
        self._buf = bytearray()
        self._pos = 0
        self._client_index = 0
        self._context = 0
        self._ids: dict[str, int] = {}
        self._messages: dict[str, Any] = {}
        self._services: dict[str, Any] = {}
        self._types: dict[str, MessageType] = {}
        self._by_id: dict[int, Any] = {}
        self._fast: dict[int, Any] = {}
        self.sent = 0
        self.received = 0

    # ---- connection -----------------------------------------------------------------
    @property
    def connected(self) -> bool:
        return self._sock is not None

    def open(self, name: str, *, definitions: bool = True) -> None:
        """Connect and register as client `name`; with `definitions`, also learn the whole
        API from VPP (without, only memclnt's messages: enough to stay connected and to
        leave with sockclnt_delete)."""
        memclnt = importlib.resources.files("vpp_papi.data").joinpath("memclnt.api.json")
        self._messages, self._services = VPPApiJSONFiles.process_json_str(memclnt.read_text())
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(str(self.socket_path))
        self._sock = sock
        create = self._messages["sockclnt_create"].pack(
            {"_vl_msg_id": SOCKCLNT_CREATE_ID, "name": name, "context": HANDSHAKE_CONTEXT})
        self._write([create])
        raw = self._read_message()
        if MSG_ID.unpack_from(raw)[0] != SOCKCLNT_CREATE_REPLY_ID:
            raise VppUnavailableError(f"{self.socket_path} did not answer the API handshake")
        reply, _ = self._messages["sockclnt_create_reply"].unpack(raw)
        if reply.response != 0:
            raise VppUnavailableError(f"VPP refused the connection ({reply.response})")
        self._client_index = reply.index
        self._ids = {m.name: m.index for m in reply.message_table}
        self._index_definitions()
        if not definitions:
            return
        # The rest of the API: its JSON definitions, from VPP itself (as vpp-papi does).
        api_json = self.exchange([("get_api_json", {})])[0]
        messages, services = VPPApiJSONFiles.process_json_array_str(api_json.json)
        self._messages.update(messages)
        self._services.update(services)
        self._index_definitions()

    def _index_definitions(self) -> None:
        self._types.clear()
        self._by_id.clear()
        self._fast.clear()
        for name, definition in self._messages.items():
            msg_id = self._ids.get(f"{name}_{definition.crc[2:]}", 0)
            if msg_id > 0:
                self._by_id[msg_id] = definition

    @property
    def message_table(self) -> list[str]:
        """VPP's messages as its handshake named them: `<name>_<crc>` each."""
        return list(self._ids)

    def close(self) -> None:
        if self._sock is None:
            return
        try:
            self.exchange([("sockclnt_delete", {"index": self._client_index})])
        except (VppUnavailableError, UnknownMessageError):
            pass  # VPP may be gone already; the socket closes either way
        finally:
            if self._sock is not None:
                self._sock.close()
                self._sock = None

    def closed_within(self, seconds: float) -> bool:
        """Whether VPP closes this connection within `seconds` (it stopped or died: the
        kernel closes its end at once). Whatever VPP sends meanwhile is kept for the next
        reads."""
        sock = self._socket()
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            ready, _, _ = select.select([sock], [], [], left)
            if not ready:
                break
            try:
                chunk = sock.recv(RECV_BYTES)
            except OSError:
                chunk = b""
            if not chunk:
                self._broken("read", "the socket was closed")
                return True
            self._buf += chunk
        return False

    def message_type(self, name: str) -> MessageType:
        found = self._types.get(name)
        if found is not None:
            return found
        definition = self._messages.get(name)
        service = self._services.get(name)
        msg_id = self._ids.get(f"{name}_{definition.crc[2:]}", 0) if definition else 0
        if definition is None or service is None or msg_id <= 0:
            raise UnknownMessageError(name)
        found = MessageType(name=name, msg_id=msg_id, definition=definition,
                            stream=bool(service.get("stream")),
                            reply_ends_stream="stream_msg" in service,
                            end_of_stream=service["reply"] if "stream_msg" in service
                            else "control_ping_reply",
                            encoder=compile_encoder(definition))
        self._types[name] = found
        return found

    # ---- encoding -------------------------------------------------------------------
    def _next_context(self) -> int:
        self._context = self._context % 0xFFFF_FFF0 + 1
        return self._context

    def encode(self, name: str, args: dict[str, Any], context: int) -> bytes:
        kind = self.message_type(name)
        fields = dict(args)
        fields["_vl_msg_id"] = kind.msg_id
        fields["client_index"] = self._client_index
        fields["context"] = context
        unknown = set(fields) - set(kind.definition.field_by_name)
        if unknown:
            raise EncodeError(f"unknown field(s) {sorted(unknown)}")
        try:
            if kind.encoder is not None:
                return bytes(kind.encoder(fields))
            return bytes(kind.definition.pack(fields))
        except Exception as exc:  # vpp-papi raises many types; its text repeats arguments
            raise EncodeError(type(exc).__name__) from None

    def reference_encode(self, name: str, args: dict[str, Any], context: int) -> bytes:
        """vpp-papi's own encoding (what the compiled encoders must reproduce)."""
        kind = self.message_type(name)
        fields = {**args, "_vl_msg_id": kind.msg_id, "client_index": self._client_index,
                  "context": context}
        return bytes(kind.definition.pack(fields))

    def decode(self, raw: bytes) -> Any:
        msg_id = MSG_ID.unpack_from(raw)[0]
        fast = self._fast.get(msg_id, _UNCOMPILED)
        if fast is _UNCOMPILED:
            definition = self._by_id.get(msg_id)
            fast = self._fast[msg_id] = compile_decoder(definition) if definition else None
        if fast is not None:
            return fast(raw)
        return self.reference_decode(raw)

    def reference_decode(self, raw: bytes) -> Any:
        """vpp-papi's own decoding (what the fast decoders must reproduce)."""
        definition = self._by_id.get(MSG_ID.unpack_from(raw)[0])
        if definition is None:
            return None
        return definition.unpack(raw)[0]

    # ---- socket I/O -----------------------------------------------------------------
    def _socket(self) -> socket.socket:
        if self._sock is None:
            raise VppUnavailableError("not connected to VPP")
        return self._sock

    def _broken(self, what: str, exc: BaseException | str) -> VppUnavailableError:
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()
        return VppUnavailableError(f"VPP stopped answering ({what}: {exc})")

    def _write(self, encoded: Sequence[bytes]) -> None:
        frames = b"".join(FRAME.pack(0, len(b), 0) + b for b in encoded)
        try:
            self._socket().sendall(frames)
        except OSError as exc:
            raise self._broken("write", exc) from None

    def _fill(self) -> None:
        if self._pos and self._pos > len(self._buf) // 2:
            del self._buf[: self._pos]
            self._pos = 0
        try:
            chunk = self._socket().recv(RECV_BYTES)
        except TimeoutError:
            raise self._broken("read", f"no reply within {self.timeout:g} s") from None
        except OSError as exc:
            raise self._broken("read", exc) from None
        if not chunk:
            raise self._broken("read", "the socket was closed")
        self._buf += chunk

    def _read_message(self) -> bytes:
        while len(self._buf) - self._pos < FRAME.size:
            self._fill()
        _, length, _ = FRAME.unpack_from(self._buf, self._pos)
        while len(self._buf) - self._pos < FRAME.size + length:
            self._fill()
        start = self._pos + FRAME.size
        self._pos = start + length
        self.received += 1
        return bytes(self._buf[start: self._pos])

    def _read_reply(self, context: int) -> Any:
        """The next message carrying `context` (event messages in between are dropped)."""
        while True:
            message = self.decode(self._read_message())
            if message is not None and getattr(message, "context", None) == context:
                return message

    # ---- exchanges ------------------------------------------------------------------
    def exchange(self, requests: Sequence[tuple[str, dict[str, Any]]],
                 window: int = DEFAULT_WINDOW) -> list[Any]:
        """Send requests back to back (at most `window` unanswered); replies in order.

        Every request is encoded before the first is sent, so a request that cannot be
        encoded fails the batch before VPP sees any of it.
        """
        contexts = [self._next_context() for _ in requests]
        encoded = []
        for position, ((name, args), ctx) in enumerate(zip(requests, contexts, strict=True)):
            try:
                encoded.append(self.encode(name, args, ctx))
            except EncodeError as exc:
                raise EncodeError(exc.reason, position) from None
        replies: list[Any] = []
        sent = 0
        while sent < len(encoded):
            batch = encoded[sent: sent + window]
            self._write(batch)
            sent += len(batch)
            self.sent += len(batch)
            # Keep one window in flight while reading: VPP works while we decode.
            while sent - len(replies) > window:
                replies.append(self._read_reply(contexts[len(replies)]))
        while len(replies) < len(encoded):
            replies.append(self._read_reply(contexts[len(replies)]))
        return replies

    def dump(self, name: str, args: dict[str, Any]) -> tuple[Any, list[Any]]:
        """(closing reply or None, details) of one dump."""
        kind = self.message_type(name)
        context = self._next_context()
        frames = [self.encode(name, args, context)]
        if kind.stream and not kind.reply_ends_stream:
            # Old-style dump: a control ping behind it marks the end of the details.
            frames.append(self.encode("control_ping", {}, context))
        self._write(frames)
        self.sent += 1
        details: list[Any] = []
        while True:
            message = self._read_reply(context)
            if type(message).__name__ == kind.end_of_stream:
                return (message if kind.reply_ends_stream else None), details
            details.append(message)

"""The etcd backend: snapshots, lease-bound registration, watches (etcd3gw, v3 JSON API).

etcd3gw speaks etcd's v3 HTTP/JSON gateway, which every etcd since 3.4 serves on its
client port, so no gRPC stack is needed. Registration is one transaction that creates
(or takes back) the node's record and claims its number atomically: two nodes starting
at once can never end up with the same number.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import requests
from etcd3gw.client import Etcd3Client
from etcd3gw.exceptions import Etcd3Exception
from etcd3gw.lease import Lease

from vppmesh.agent.datastore.records import (
    DatastoreUrl,
    Record,
    Snapshot,
    assemble,
    encode_record,
    free_number,
    mesh_error,
    parse_record,
    parse_settings,
)
from vppmesh.config import Mesh, MeshSettings, Node
from vppmesh.errors import ConfigError, SourceUnavailableError

log = logging.getLogger("vppmesh.agent.datastore")
REGISTER_ATTEMPTS = 8
REQUEST_TIMEOUT = 5.0


class DatastoreError(SourceUnavailableError):
    """etcd cannot be reached or refused a request."""


class RegistrationError(ConfigError):
    """This node's record conflicts with another node's."""


def b64(data: str | bytes) -> str:
    return base64.b64encode(data.encode() if isinstance(data, str) else data).decode()


def range_end(prefix: str) -> str:
    """The first key after every key that starts with `prefix`."""
    return prefix[:-1] + chr(ord(prefix[-1]) + 1)


@dataclass(frozen=True)
class Registration:
    """A node's record as stored, and the lease that keeps it."""

    node: Node
    lease: Lease
    revision: int


class EtcdStore:
    """The membership prefix of one etcd cluster."""

    def __init__(self, url: DatastoreUrl, *, timeout: float = REQUEST_TIMEOUT) -> None:
        self.url = url
        self.client = Etcd3Client(
            host=url.host, port=url.port, timeout=timeout, api_path="/v3/",
            protocol="https" if url.tls else "http",
            ca_cert=str(url.ca) if url.ca else None,
            cert_cert=str(url.cert) if url.cert else None,
            cert_key=str(url.key) if url.key else None)
        if url.ca is not None:
            # requests lets REQUESTS_CA_BUNDLE/CURL_CA_BUNDLE override a session's CA;
            # the CA named in the URL must win.
            self.client.session.trust_env = False

    # ---- plumbing -------------------------------------------------------------------
    def _post(self, path: str, body: dict[str, Any]) -> Any:
        try:
            return self.client.post(self.client.get_url(path), json=body)
        except Etcd3Exception as exc:
            raise DatastoreError(f"etcd at {self.url.host}:{self.url.port}: {path} failed "
                                 f"({type(exc).__name__}: {exc}); is etcd running and "
                                 "reachable from this host?") from None

    def _txn(self, compare: list[dict[str, Any]], success: list[dict[str, Any]]) -> bool:
        reply = self._post("/kv/txn", {"compare": compare, "success": success, "failure": []})
        return bool(reply.get("succeeded", False))

    # ---- reading --------------------------------------------------------------------
    def snapshot(self) -> Snapshot:
        """Settings, every node record and every number claim, at one revision."""
        prefix = self.url.prefix + "/"
        reply = self._post("/kv/range", {"key": b64(prefix), "range_end": b64(range_end(prefix))})
        settings: bytes | None = None
        records: list[Record] = []
        numbers: dict[int, str] = {}
        for kv in reply.get("kvs", []):
            key = base64.b64decode(kv["key"]).decode(errors="replace")
            value = base64.b64decode(kv.get("value", ""))
            if key == self.url.settings_key:
                settings = value
            elif key.startswith(self.url.nodes_prefix):
                records.append(Record(name=key.removeprefix(self.url.nodes_prefix),
                                      value=value, create_revision=int(kv["create_revision"]),
                                      mod_revision=int(kv["mod_revision"]),
                                      lease=int(kv.get("lease", 0))))
            elif key.startswith(self.url.numbers_prefix):
                number = key.removeprefix(self.url.numbers_prefix)
                if number.isdigit():
                    numbers[int(number)] = value.decode(errors="replace")
        return Snapshot(revision=int(reply["header"]["revision"]), settings=settings,
                        records=tuple(records), numbers=numbers)

    def settings(self, snapshot: Snapshot | None = None) -> MeshSettings:
        snap = snapshot or self.snapshot()
        return parse_settings(snap.settings, f"{self.url} settings")

    def seed_settings(self, settings: MeshSettings) -> bool:
        """Store the mesh settings unless some are stored already; True if these were."""
        raw = settings.model_dump_json(exclude_none=True)
        key = b64(self.url.settings_key)
        return self._txn([{"key": key, "target": "CREATE", "result": "EQUAL",
                           "create_revision": 0}],
                         [{"request_put": {"key": key, "value": b64(raw)}}])

    # ---- this node --------------------------------------------------------------------
    def grant(self, ttl: int) -> Lease:
        reply = self._post("/lease/grant", {"TTL": ttl, "ID": 0})
        return Lease(int(reply["ID"]), client=self.client)

    def revoke(self, lease: Lease) -> None:
        """Give a lease up (its keys go with it); an unreachable etcd lets it expire."""
        try:
            self._post("/lease/revoke", {"ID": lease.id})
        except DatastoreError as exc:
            log.warning("%s", exc)

    def keepalive(self, lease: Lease) -> bool:
        """Refresh the lease; False once it has expired (the record is gone then)."""
        try:
            return lease.refresh() > 0
        except Etcd3Exception as exc:
            raise DatastoreError(f"etcd at {self.url.host}:{self.url.port}: lease keepalive "
                                 f"failed ({exc})") from None

    def register(self, node: Node, lease: Lease, *, requested_number: int | None = None,
                 previous_key: str | None = None) -> Registration:
        """Create or take back this node's record under `lease`, claiming its number.

        The record is checked against every other node first (same rules as the mesh
        file); a conflict is refused with the reason, and nothing is written.
        """
        for _ in range(REGISTER_ATTEMPTS):
            snap = self.snapshot()
            settings = self.settings(snap)
            own = next((r for r in snap.records if r.name == node.name), None)
            if own is not None:
                try:
                    current = parse_record(own)
                except ConfigError:
                    current = None
                # A record under the node's previous key (a key rotation: the agent
                # holds KEY.previous, so it is the same host) moves to the new key.
                if current is not None and current.public_key not in (node.public_key,
                                                                      previous_key):
                    raise RegistrationError(
                        f"node name {node.name!r} is registered in {self.url} with another "
                        "public key: another host uses this name. Pick another --node, or, "
                        "if this host's key changed, run `vppmesh down --datastore` on the "
                        "old host or wait for its lease to expire")
            number = free_number(snap.numbers, node.name, requested_number)
            candidate = node.model_copy(update={"node_number": number})
            others = assemble(settings, [r for r in snap.records if r.name != node.name],
                              snap.numbers)
            peers = list(others.mesh.nodes) if others.mesh else []
            error = mesh_error(settings, [*peers, candidate])
            if error is not None:
                raise RegistrationError(f"node {node.name!r} cannot join {self.url}: {error}")
            node_key = b64(self.url.node_key(node.name))
            number_key = b64(self.url.number_key(number))
            compare = [
                {"key": node_key, "target": "MOD", "result": "EQUAL",
                 "mod_revision": own.mod_revision} if own is not None else
                {"key": node_key, "target": "CREATE", "result": "EQUAL", "create_revision": 0},
                {"key": number_key, "target": "VALUE", "result": "EQUAL",
                 "value": b64(node.name)} if snap.numbers.get(number) == node.name else
                {"key": number_key, "target": "CREATE", "result": "EQUAL",
                 "create_revision": 0},
            ]
            success = [
                {"request_put": {"key": node_key, "value": b64(encode_record(candidate)),
                                 "lease": lease.id}},
                {"request_put": {"key": number_key, "value": b64(node.name)}},
            ]
            if self._txn(compare, success):
                log.info("registered %s as node number %d in %s", node.name, number, self.url)
                return Registration(node=candidate, lease=lease, revision=snap.revision)
            log.info("registration of %s raced with another node; trying again", node.name)
        raise DatastoreError(f"could not register {node.name!r} in {self.url} after "
                             f"{REGISTER_ATTEMPTS} attempts (too many nodes joining at once?)")

    def deregister(self, name: str, *, release_number: bool = True) -> bool:
        """Delete this node's record (and its number claim); True if a record was there."""
        snap = self.snapshot()
        had = any(r.name == name for r in snap.records)
        self._post("/kv/deleterange", {"key": b64(self.url.node_key(name))})
        if release_number:
            for number, owner in snap.numbers.items():
                if owner == name:
                    key = b64(self.url.number_key(number))
                    self._txn([{"key": key, "target": "VALUE", "result": "EQUAL",
                                "value": b64(name)}],
                              [{"request_delete_range": {"key": key}}])
        return had

    # ---- watching ---------------------------------------------------------------------
    def watch(self, start_revision: int, on_change: Callable[[], None],
              on_broken: Callable[[], None] = lambda: None) -> Callable[[], None]:
        """Call `on_change` on every change under the prefix after `start_revision`.

        Returns the function that stops the watch. `on_broken` is called if the stream
        ends by itself (etcd restarted, connection lost), so the caller can re-arm it.
        etcd3gw's own Watcher reads its stream in an executor whose end nobody sees, so
        the stream is read here, on etcd3gw's session.
        """
        prefix = self.url.prefix + "/"
        body = {"create_request": {"key": b64(prefix), "range_end": b64(range_end(prefix)),
                                   "start_revision": start_revision}}
        try:
            response = self.client.session.post(
                self.client.get_url("/watch"), json=body, stream=True,
                timeout=(self.client.timeout, None))
        except requests.RequestException as exc:
            raise DatastoreError(f"etcd at {self.url.host}:{self.url.port}: watch failed "
                                 f"({exc})") from None
        if response.status_code != 200:
            response.close()
            raise DatastoreError(f"etcd at {self.url.host}:{self.url.port}: watch refused "
                                 f"(HTTP {response.status_code})")
        stopped = threading.Event()

        def read() -> None:
            try:
                for line in response.iter_lines():
                    if stopped.is_set():
                        return
                    result = json.loads(line).get("result", {}) if line.strip() else {}
                    if result.get("canceled"):
                        log.warning("etcd cancelled the watch (%s)",
                                    result.get("cancel_reason", "compacted?"))
                        break
                    if result.get("events"):
                        on_change()
            except (requests.RequestException, OSError, ValueError) as exc:
                log.debug("watch stream ended: %s", exc)
            finally:
                response.close()
                if not stopped.is_set():
                    on_broken()

        def stop() -> None:
            stopped.set()
            # Shut the socket down: a thread blocked reading it wakes up and returns.
            try:
                with socket.socket(fileno=os.dup(response.raw.fileno())) as sock:
                    sock.shutdown(socket.SHUT_RDWR)
            except (OSError, ValueError, AttributeError):
                pass  # already closed (urllib3 drops its file object on close)
            response.close()

        threading.Thread(target=read, daemon=True, name="vppmesh-watch").start()
        return stop


def current_mesh(url: DatastoreUrl, *, store: EtcdStore | None = None) -> Mesh:
    """The mesh every agent derives from the datastore now (for `plan` and `status`)."""
    store = store or EtcdStore(url)
    snap = store.snapshot()
    membership = assemble(store.settings(snap), snap.records, snap.numbers)
    for reason in sorted(set(membership.rejected.values())):
        log.warning("ignoring %s", reason)
    if membership.mesh is None:
        raise ConfigError(f"{url}: no node is registered")
    return membership.mesh

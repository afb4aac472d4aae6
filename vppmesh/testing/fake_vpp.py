"""A stand-in for VPP's binary API in unit tests: keeps state like the real thing.

It answers the messages vppmesh sends with VPP's semantics where they matter to the
controller (sw_if_index allocation, fixed IPIP instances, duplicate and missing objects,
"address found" when re-tabling an unnumbered interface, protection needing its SAs,
route replacement, table flush), and counts every message. Each message it knows is
also sent to a real VPP by the integration tests.
"""

from __future__ import annotations

import ipaddress
from collections import Counter
from collections.abc import Sequence
from types import SimpleNamespace as NS
from typing import Any

from vppmesh.dataplane.vpp.client import Request, check_replies, check_reply
from vppmesh.dataplane.vpp.interfaces import RX_MODE_ADAPTIVE, RX_MODE_INTERRUPT, RX_MODE_POLLING
from vppmesh.errors import VppApiError

INVALID_SW_IF_INDEX = -2
NO_SUCH_FIB = -3
NO_SUCH_ENTRY = -6
PATH_NORMAL, PATH_DROP = 0, 2
# The drop routes VPP puts into every IPv4 table (0.0.0.0/0 until a default is added).
TABLE_DROP_ROUTES = ("0.0.0.0/0", "0.0.0.0/32", "224.0.0.0/4", "240.0.0.0/4",
                     "255.255.255.255/32")
ADDRESS_FOUND = -114
ENTRY_EXISTS = -116
INSTANCE_IN_USE = -147
SA_IN_USE = -7


class FakeVpp:
    def __init__(self, workers: int = 0) -> None:
        self.workers = workers
        self.ifaces: dict[int, dict[str, Any]] = {0: self._iface("local0", "local")}
        self.next_index = 1
        self.tunnels: dict[int, dict[str, Any]] = {}  # sw_if_index -> tunnel
        self.tunnel_instances: set[int] = set()
        self.tunnel_ends: set[tuple[str, str]] = set()
        self.sas: dict[int, dict[str, Any]] = {}
        self.protections: dict[int, tuple[int, tuple[int, ...]]] = {}
        self.tables: set[int] = {0}
        self.table_names: dict[int, str] = {}  # VPP names an unnamed table ipv4-VRF:<id>
        self.routes: dict[int, dict[str, tuple[int, ...]]] = {0: {}}
        self.addresses: dict[int, list[str]] = {}
        self.unnumbered: dict[int, int] = {}
        self.table_of: dict[int, int] = {}
        self.neighbors: dict[int, dict[str, str]] = {}
        self.af_packet: dict[str, int] = {}
        self.taps: dict[int, str] = {}  # sw_if_index -> Linux name
        self.gso: set[int] = set()
        self.async_mode = False
        self.sent = 0
        self.counts: Counter[str] = Counter()
        self.fail_on: dict[str, int] = {}  # message name -> retval to answer once
        self.pid = 4242
        # VPP's own punt socket (startup.conf `punt { socket }`; None: not configured, and
        # registrations fail as VPP's do) and the registrations: (af, port) -> path.
        self.punt_socket: str | None = None
        self.punt_registrations: dict[tuple[int, int], str] = {}
        # Exception punt reasons VPP allocates at start (ipsec_punt.h's, in its order),
        # and those registered to a socket: reason id -> path.
        self.punt_reasons = {"ipsec4-spi-o-udp-0": 1, "ipsec4-no-such-tunnel": 2,
                             "ipsec6-no-such-tunnel": 3, "ipsec6-spi-o-udp-0": 4}
        self.punt_exceptions: dict[int, str] = {}
        self.classify_tables: dict[int, dict[str, Any]] = {}
        self.input_acl: dict[int, dict[str, int]] = {}  # sw_if_index -> family -> table
        # Engines able to run vppmesh's AES-GCM (ESN) single-buffer and chained ops, the
        # active ones, and the priority the native engine's AES-GCM probe gave the code it
        # took (20: AVX2, 50: VAES+AVX-512). Like 26.06, native has no chained AES-GCM.
        self.crypto_engines = ["openssl", "ipsecmb", "native"]
        self.crypto_active = "native"
        self.crypto_chained = "ipsecmb"
        self.native_gcm_priority = 20

    # ---- VppApi ------------------------------------------------------------------
    @property
    def messages_sent(self) -> int:
        return self.sent

    def _answer(self, request: Request) -> Any:
        self.sent += 1
        self.counts[request.name] += 1
        if request.name in self.fail_on:
            return NS(retval=self.fail_on.pop(request.name))
        return getattr(self, "m_" + request.name)(**request.args)

    def call(self, request: Request) -> Any:
        return check_reply(request, self._answer(request))

    def call_many(self, requests: Sequence[Request]) -> list[Any]:
        """Like the pipelined client: every request is handled, then all are checked.

        Each goes through call(), so subclasses that record calls see batches too.
        """
        replies = []
        for request in requests:
            try:
                replies.append(self.call(request))
            except VppApiError as exc:
                replies.append(NS(retval=exc.retval))
        return check_replies(requests, replies)

    def close(self) -> None:
        """Like VppClient.close (the state stays: it is VPP's, not the connection's)."""

    def dump(self, name: str, **args: Any) -> list[Any]:
        self.sent += 1
        self.counts[name] += 1
        return getattr(self, "d_" + name)(**args)

    # ---- helpers -----------------------------------------------------------------
    @staticmethod
    def _iface(name: str, dev_type: str, mac: str = "00:00:00:00:00:00", tag: str = ""
               ) -> dict[str, Any]:
        # rx_mode as VPP starts each kind: af_packet waits on interrupts, taps poll.
        return {"name": name, "dev_type": dev_type, "mac": mac, "tag": tag, "flags": 0,
                "mtu": 9000 if dev_type != "local" else 0,
                "rx_mode": RX_MODE_INTERRUPT if dev_type == "af-packet" else RX_MODE_POLLING}

    def _new_iface(self, name: str, dev_type: str, **kw: Any) -> int:
        index = self.next_index
        self.next_index += 1
        self.ifaces[index] = self._iface(name, dev_type, **kw)
        return index

    @classmethod
    def with_uplink(cls, primary: object, workers: int = 0, name: str = "host-eth0"
                    ) -> FakeVpp:
        vpp = cls(workers)
        index = vpp._new_iface(name, "af-packet", mac="02:00:00:00:00:01")
        vpp.ifaces[index]["flags"] = 3
        vpp.ifaces[index]["mtu"] = 1500
        vpp.addresses[index] = [str(primary)]
        return vpp

    def owned_objects(self) -> dict[str, int]:
        """How many objects in the reserved ranges / tags remain (for `down` checks)."""
        from vppmesh.dataplane.state import is_owned_sa_id, is_owned_tunnel_instance

        return {
            "tunnels": sum(1 for t in self.tunnels.values()
                           if is_owned_tunnel_instance(t["instance"])),
            "sas": sum(1 for s in self.sas if is_owned_sa_id(s)),
            "tagged": sum(1 for i in self.ifaces.values() if i["tag"].startswith("vppmesh:")),
            "protections": len(self.protections),
        }

    # ---- messages ----------------------------------------------------------------
    # punt (the agents' channel)
    def m_punt_socket_register(self, header_version: int, punt: dict[str, Any],
                               pathname: str) -> Any:
        if self.punt_socket is None:
            return NS(retval=-1, pathname="")  # "socket is not configured"
        if punt["type"] == 2:  # PUNT_API_TYPE_EXCEPTION
            reason = punt["punt"]["exception"]["id"]
            if reason not in self.punt_reasons.values():
                return NS(retval=-1, pathname="")
            self.punt_exceptions[reason] = pathname
            return NS(retval=0, pathname=self.punt_socket)
        l4 = punt["punt"]["l4"]
        self.punt_registrations[(l4["af"], l4["port"])] = pathname
        return NS(retval=0, pathname=self.punt_socket)

    def m_punt_socket_deregister(self, punt: dict[str, Any]) -> Any:
        l4 = punt["punt"]["l4"]
        return NS(retval=0 if self.punt_registrations.pop((l4["af"], l4["port"]), None)
                  else -6)

    def d_punt_reason_dump(self, reason: dict[str, Any]) -> list[Any]:
        return [NS(reason=NS(id=i, name=name)) for name, i in self.punt_reasons.items()
                if not reason.get("name") or reason["name"] == name]

    def d_punt_socket_dump(self, type: int) -> list[Any]:
        if type == 2:
            return [NS(pathname=path, punt=NS(punt=NS(exception=NS(id=reason))))
                    for reason, path in sorted(self.punt_exceptions.items())]
        return [NS(pathname=path, punt=NS(punt=NS(l4=NS(af=af, protocol=17, port=port))))
                for (af, port), path in sorted(self.punt_registrations.items())]

    # classify (input ACL)
    def m_classify_add_del_table(self, is_add: bool, mask: bytes = b"", table_index: int = 0,
                                 match_n_vectors: int = 1, mask_len: int = 0,
                                 **_: Any) -> Any:
        if mask_len != match_n_vectors * 16:  # checked on delete too
            return NS(retval=-7)
        if not is_add:
            if table_index not in self.classify_tables or table_index in \
                    {t for ts in self.input_acl.values() for t in ts.values()}:
                return NS(retval=NO_SUCH_ENTRY)
            self.classify_tables.pop(table_index)
            return NS(retval=0)
        index = max(self.classify_tables, default=-1) + 1
        self.classify_tables[index] = {"mask": bytes(mask), "sessions": set()}
        return NS(retval=0, new_table_index=index)

    def m_classify_add_del_session(self, is_add: bool, table_index: int, match: bytes,
                                   **_: Any) -> Any:
        if table_index not in self.classify_tables:
            return NS(retval=NO_SUCH_ENTRY)
        self.classify_tables[table_index]["sessions"].add(bytes(match))
        return NS(retval=0)

    def m_input_acl_set_interface(self, sw_if_index: int, ip4_table_index: int,
                                  ip6_table_index: int, is_add: bool, **_: Any) -> Any:
        if sw_if_index not in self.ifaces:
            return NS(retval=INVALID_SW_IF_INDEX)
        bound = self.input_acl.setdefault(sw_if_index, {})
        for family, table in (("ip4", ip4_table_index), ("ip6", ip6_table_index)):
            if table != 0xFFFFFFFF:
                if is_add:
                    bound[family] = table
                else:
                    bound.pop(family, None)
        return NS(retval=0)

    def m_classify_table_by_interface(self, sw_if_index: int) -> Any:
        bound = self.input_acl.get(sw_if_index, {})
        return NS(retval=0, sw_if_index=sw_if_index, l2_table_id=0xFFFFFFFF,
                  ip4_table_id=bound.get("ip4", 0xFFFFFFFF),
                  ip6_table_id=bound.get("ip6", 0xFFFFFFFF))

    def m_classify_table_info(self, table_id: int) -> Any:
        t = self.classify_tables.get(table_id)
        if t is None:
            return NS(retval=NO_SUCH_ENTRY)
        return NS(retval=0, mask=t["mask"], mask_length=len(t["mask"]),
                  active_sessions=len(t["sessions"]))

    def m_control_ping(self) -> Any:
        return NS(retval=0, vpe_pid=self.pid)

    def m_show_version(self) -> Any:
        return NS(retval=0, version="26.06-fake")

    def m_show_threads(self) -> Any:
        threads = [NS(type="")] + [NS(type="workers") for _ in range(self.workers)]
        return NS(retval=0, thread_data=threads)

    # crypto: VPP answers these from its CLI only (formats of vnet/crypto/cli.c)
    def _chained_engines(self) -> list[str]:
        return [e for e in self.crypto_engines if e != "native"]

    def m_cli_inband(self, cmd: str) -> Any:
        if cmd == "show crypto handlers":
            def cell(engines: list[str], active: str) -> str:
                return " ".join(e + ("*" if e == active else "") for e in engines) or "-"
            simple = cell(self.crypto_engines, self.crypto_active)
            chained = cell(self._chained_engines(), self.crypto_chained)
            reply = ("\x1b[33mAlgorithm   \x1b[0m \x1b[33mOp  \x1b[0m \x1b[33mSimple  "
                     "\x1b[0m \x1b[33mChained  \x1b[0m \x1b[33mAsync  \x1b[0m\n")
            for alg in ("aes-256-gcm", "aes-256-gcm-icv16-aad12"):
                for op in ("enc", "dec"):
                    reply += (f"{alg if op == 'enc' else '':<30} {op}  {simple}   {chained}   "
                              "sw_scheduler*\n")
        elif cmd == "show crypto engines":
            prio = {"native": 100, "ipsecmb": 80, "openssl": 50}
            reply = "Name                Prio    Description\n" + "".join(
                f"{e:<20}{prio.get(e, 10):<8}{e} engine\n" for e in self.crypto_engines)
        elif cmd == "show logging":
            reply = ("2026/11/30 03:00:00:001 debug      crypto/main    engine native selected "
                     f"group native_gcm256_group priority={self.native_gcm_priority} "
                     "key-data-sz=480 per-thread=0\n")
        else:
            reply = ""
        return NS(retval=0, reply=reply)

    def m_crypto_set_handler(self, alg_name: str, engine: str, oct: int, is_async: int) -> Any:
        chained = oct == 1
        known = self._chained_engines() if chained else self.crypto_engines
        if engine not in known or alg_name != "aes-256-gcm-icv16-aad12" or oct == 2:
            return NS(retval=-1)
        if chained:
            self.crypto_chained = engine
        else:
            self.crypto_active = engine
        return NS(retval=0)

    def m_ipsec_set_async_mode(self, async_enable: bool) -> Any:
        self.async_mode = async_enable
        return NS(retval=0)

    def d_sw_interface_dump(self, sw_if_index: int) -> list[Any]:
        """Every interface, or like VPP only the one asked for (none if it does not exist)."""
        return [NS(sw_if_index=i, interface_name=f["name"], tag=f["tag"], flags=f["flags"],
                   mtu=[f["mtu"], 0, 0, 0], l2_address=f["mac"], interface_dev_type=f["dev_type"])
                for i, f in sorted(self.ifaces.items())
                if sw_if_index in (0xFFFFFFFF, i)]

    def _check(self, index: int) -> int | None:
        return None if index in self.ifaces else INVALID_SW_IF_INDEX

    def m_sw_interface_set_flags(self, sw_if_index: int, flags: int) -> Any:
        if err := self._check(sw_if_index):
            return NS(retval=err)
        link = 2 if flags & 1 else 0
        self.ifaces[sw_if_index]["flags"] = (flags & 1) | link
        return NS(retval=0)

    def m_sw_interface_set_mtu(self, sw_if_index: int, mtu: list[int]) -> Any:
        if err := self._check(sw_if_index):
            return NS(retval=err)
        self.ifaces[sw_if_index]["mtu"] = mtu[0]
        return NS(retval=0)

    def m_sw_interface_set_table(self, sw_if_index: int, is_ipv6: bool, vrf_id: int) -> Any:
        if err := self._check(sw_if_index):
            return NS(retval=err)
        if vrf_id not in self.tables:
            return NS(retval=NO_SUCH_FIB)
        if self.addresses.get(sw_if_index) or sw_if_index in self.unnumbered:
            return NS(retval=ADDRESS_FOUND)
        self.table_of[sw_if_index] = vrf_id
        return NS(retval=0)

    def m_sw_interface_set_unnumbered(self, sw_if_index: int, unnumbered_sw_if_index: int,
                                      is_add: bool) -> Any:
        for i in (sw_if_index, unnumbered_sw_if_index):
            if err := self._check(i):
                return NS(retval=err)
        if is_add:
            self.unnumbered[unnumbered_sw_if_index] = sw_if_index
        else:
            self.unnumbered.pop(unnumbered_sw_if_index, None)
        return NS(retval=0)

    def d_ip_unnumbered_dump(self, sw_if_index: int) -> list[Any]:
        return [NS(sw_if_index=k, ip_sw_if_index=v) for k, v in self.unnumbered.items()]

    def m_sw_interface_tag_add_del(self, is_add: bool, sw_if_index: int, tag: str) -> Any:
        if err := self._check(sw_if_index):
            return NS(retval=err)
        self.ifaces[sw_if_index]["tag"] = tag if is_add else ""
        return NS(retval=0)

    def m_sw_interface_add_del_address(self, sw_if_index: int, is_add: bool, del_all: bool,
                                       prefix: str) -> Any:
        if err := self._check(sw_if_index):
            return NS(retval=err)
        have = self.addresses.setdefault(sw_if_index, [])
        if is_add:
            if prefix in have:
                return NS(retval=ADDRESS_FOUND)
            have.append(prefix)
        else:
            if prefix not in have:
                return NS(retval=-60)
            have.remove(prefix)
        return NS(retval=0)

    def d_ip_address_dump(self, sw_if_index: int, is_ipv6: bool) -> list[Any]:
        return [NS(prefix=p) for p in self.addresses.get(sw_if_index, [])
                if (ipaddress.ip_interface(p).version == 6) == is_ipv6]

    def m_create_loopback_instance(self, mac_address: str, is_specified: bool,
                                   user_instance: int) -> Any:
        n = sum(1 for f in self.ifaces.values() if f["dev_type"] == "Loopback")
        return NS(retval=0, sw_if_index=self._new_iface(f"loop{n}", "Loopback",
                                                        mac=mac_address))

    def _delete_iface(self, index: int) -> None:
        self.ifaces.pop(index, None)
        self.unnumbered.pop(index, None)
        self.addresses.pop(index, None)
        self.table_of.pop(index, None)
        self.neighbors.pop(index, None)
        for table in self.routes.values():
            for prefix in [p for p, paths in table.items() if index in paths]:
                table.pop(prefix)

    def m_delete_loopback(self, sw_if_index: int) -> Any:
        if err := self._check(sw_if_index):
            return NS(retval=err)
        self._delete_iface(sw_if_index)
        return NS(retval=0)

    def m_feature_gso_enable_disable(self, sw_if_index: int, enable_disable: bool) -> Any:
        if err := self._check(sw_if_index):
            return NS(retval=err)
        (self.gso.add if enable_disable else self.gso.discard)(sw_if_index)
        return NS(retval=0)

    # ipip
    def m_ipip_add_tunnel(self, tunnel: dict[str, Any]) -> Any:
        if tunnel["instance"] in self.tunnel_instances:
            return NS(retval=INSTANCE_IN_USE)
        if (tunnel["src"], tunnel["dst"]) in self.tunnel_ends:
            return NS(retval=ENTRY_EXISTS)
        index = self._new_iface(f"ipip{tunnel['instance']}", "IPIP tunnel device")
        self.tunnels[index] = dict(tunnel)
        self.tunnel_instances.add(tunnel["instance"])
        self.tunnel_ends.add((tunnel["src"], tunnel["dst"]))
        return NS(retval=0, sw_if_index=index)

    def m_ipip_del_tunnel(self, sw_if_index: int) -> Any:
        if sw_if_index not in self.tunnels:
            return NS(retval=INVALID_SW_IF_INDEX)
        gone = self.tunnels.pop(sw_if_index)
        self.tunnel_instances.discard(gone["instance"])
        self.tunnel_ends.discard((gone["src"], gone["dst"]))
        self.protections.pop(sw_if_index, None)
        self._delete_iface(sw_if_index)
        return NS(retval=0)

    def d_ipip_tunnel_dump(self, sw_if_index: int) -> list[Any]:
        return [NS(tunnel=NS(sw_if_index=i, instance=t["instance"], src=t["src"], dst=t["dst"],
                             table_id=t["table_id"]))
                for i, t in sorted(self.tunnels.items())]

    # ipsec
    def m_ipsec_sad_entry_add_v2(self, entry: dict[str, Any]) -> Any:
        if entry["sad_id"] in self.sas:
            return NS(retval=ENTRY_EXISTS)
        # VPP reports thread 0 for an unbound SA without workers, else ~0 (16 bits).
        unbound = 0 if self.workers == 0 else 0xFFFF
        # VPP's SA pool: a deleted SA's index (its counters' too) goes to the next one.
        taken = {sa["stat_index"] for sa in self.sas.values()}
        index = next(i for i in range(len(self.sas) + 1) if i not in taken)
        self.sas[entry["sad_id"]] = {"entry": dict(entry), "thread": unbound,
                                     "stat_index": index}
        return NS(retval=0, stat_index=self.sas[entry["sad_id"]]["stat_index"])

    def m_ipsec_sad_entry_del(self, id: int) -> Any:
        if id not in self.sas:
            return NS(retval=NO_SUCH_ENTRY)
        if any(id == out or id in ins for out, ins in self.protections.values()):
            return NS(retval=SA_IN_USE)
        self.sas.pop(id)
        return NS(retval=0)

    def m_ipsec_sad_bind(self, sa_id: int, worker: int) -> Any:
        if sa_id not in self.sas:
            return NS(retval=NO_SUCH_ENTRY)
        if worker >= self.workers:
            return NS(retval=-7)
        self.sas[sa_id]["thread"] = worker + 1
        return NS(retval=0)

    def d_ipsec_sa_v5_dump(self, sa_id: int) -> list[Any]:
        out = []
        for sid, sa in sorted(self.sas.items()):
            e = sa["entry"]
            salt = int.from_bytes(e["salt"].to_bytes(4, "big"), "little")  # as VPP dumps it
            key = e["crypto_key"]
            out.append(NS(entry=NS(
                sad_id=sid, spi=e["spi"], crypto_algorithm=e["crypto_algorithm"],
                crypto_key=NS(length=key["length"], data=key["data"]), flags=e["flags"],
                salt=salt, anti_replay_window_size=e["anti_replay_window_size"],
                # VPP reports the ports of UDP-encapsulated SAs only (else zeros).
                udp_src_port=e.get("udp_src_port", 4500) if e["flags"] & 0x10 else 0,
                udp_dst_port=e.get("udp_dst_port", 4500) if e["flags"] & 0x10 else 0),
                thread_index=sa["thread"], seq_outbound=sa.get("seq_out", 0),
                last_seq_inbound=sa.get("last_seq_in", 0),
                stat_index=sa["stat_index"], sw_if_index=0xFFFFFFFF))
        return out

    def sa_packets(self, stat_indexes: list[int]) -> dict[int, int]:
        """The stats segment's /net/ipsec/sa packet counters (StatsReader.sa_packets):
        what an SA encrypted or accepted, as its seq_out / last_seq_in say (tests move
        those); a FakeVpp is its own stats reader (vpp/stats.SaCounters' open_reader)."""
        by_index = {sa["stat_index"]: sa for sa in self.sas.values()}
        return {i: max(by_index.get(i, {}).get("seq_out", 0),
                       by_index.get(i, {}).get("last_seq_in", 0)) for i in stat_indexes}

    def m_ipsec_tunnel_protect_update(self, tunnel: dict[str, Any]) -> Any:
        if tunnel["sw_if_index"] not in self.tunnels:
            return NS(retval=INVALID_SW_IF_INDEX)
        for sa in (tunnel["sa_out"], *tunnel["sa_in"]):
            if sa not in self.sas:
                return NS(retval=NO_SUCH_ENTRY)
        self.protections[tunnel["sw_if_index"]] = (tunnel["sa_out"], tuple(tunnel["sa_in"]))
        return NS(retval=0)

    def m_ipsec_tunnel_protect_del(self, sw_if_index: int, nh: str) -> Any:
        if sw_if_index not in self.protections:
            return NS(retval=NO_SUCH_ENTRY)
        self.protections.pop(sw_if_index)
        return NS(retval=0)

    def d_ipsec_tunnel_protect_dump(self, sw_if_index: int) -> list[Any]:
        return [NS(tun=NS(sw_if_index=i, sa_out=o, sa_in=list(ins)))
                for i, (o, ins) in sorted(self.protections.items())]

    # fib
    def m_ip_table_add_del(self, is_add: bool, table: dict[str, Any]) -> Any:
        tid = table["table_id"]
        if is_add:
            if tid not in self.tables:  # a table keeps the name it was created with
                self.table_names[tid] = table.get("name") or f"ipv4-VRF:{tid}"
            self.tables.add(tid)
            self.routes.setdefault(tid, {})
        else:
            if tid not in self.tables:
                return NS(retval=NO_SUCH_FIB)
            if any(t == tid for t in self.table_of.values()):
                return NS(retval=-7)  # still bound to an interface
            self.tables.discard(tid)
            self.routes.pop(tid, None)
        return NS(retval=0)

    def d_ip_table_dump(self) -> list[Any]:
        return [NS(table=NS(table_id=t, is_ip6=False,
                            name=self.table_names.get(t, f"ipv4-VRF:{t}")))
                for t in sorted(self.tables)]

    def m_ip_route_add_del(self, is_add: bool, is_multipath: bool, route: dict[str, Any]) -> Any:
        table = self.routes.get(route["table_id"])
        if table is None:
            return NS(retval=NO_SUCH_FIB)
        prefix = str(ipaddress.ip_network(route["prefix"]))
        if is_add:
            if [p["type"] for p in route["paths"]] == [PATH_DROP]:
                table[prefix] = ()  # a drop route: no interface
                return NS(retval=0)
            paths = tuple(p["sw_if_index"] for p in route["paths"])
            for p in paths:
                if p not in self.ifaces:
                    return NS(retval=INVALID_SW_IF_INDEX)
            table[prefix] = paths
        else:
            if prefix not in table:
                return NS(retval=NO_SUCH_ENTRY)
            table.pop(prefix)
        return NS(retval=0)

    def d_ip_route_dump(self, table: dict[str, Any]) -> list[Any]:
        """Like VPP: every table also holds its own drop routes, and a drop path has no
        interface."""
        if table["table_id"] not in self.routes:
            return []
        routes = dict.fromkeys(TABLE_DROP_ROUTES, ())
        routes.update(self.routes[table["table_id"]])
        drop = [NS(sw_if_index=0xFFFFFFFF, type=PATH_DROP)]
        return [NS(route=NS(prefix=p, paths=[NS(sw_if_index=i, type=PATH_NORMAL)
                                             for i in paths] or drop))
                for p, paths in sorted(routes.items())]

    def m_ip_neighbor_add_del(self, is_add: bool, neighbor: dict[str, Any]) -> Any:
        index = neighbor["sw_if_index"]
        if err := self._check(index):
            return NS(retval=err)
        table = self.neighbors.setdefault(index, {})
        if is_add:
            table[neighbor["ip_address"]] = neighbor["mac_address"]
        elif table.pop(neighbor["ip_address"], None) is None:
            return NS(retval=NO_SUCH_ENTRY)
        return NS(retval=0)

    def d_ip_neighbor_dump(self, sw_if_index: int, af: int) -> list[Any]:
        return [NS(neighbor=NS(ip_address=ip, mac_address=mac))
                for ip, mac in self.neighbors.get(sw_if_index, {}).items()]

    # host interfaces
    def m_af_packet_create_v3(self, host_if_name: str, hw_addr: str, **_: Any) -> Any:
        if host_if_name in self.af_packet:
            return NS(retval=-79)
        index = self._new_iface(f"host-{host_if_name}", "af-packet", mac=hw_addr)
        self.af_packet[host_if_name] = index
        return NS(retval=0, sw_if_index=index)

    def m_af_packet_delete(self, host_if_name: str) -> Any:
        index = self.af_packet.pop(host_if_name, None)
        if index is None:
            return NS(retval=INVALID_SW_IF_INDEX)
        self._delete_iface(index)
        return NS(retval=0)

    def d_af_packet_dump(self) -> list[Any]:
        return [NS(host_if_name=n, sw_if_index=i) for n, i in self.af_packet.items()]

    def m_tap_create_v3(self, host_if_name: str, mac_address: str, **_: Any) -> Any:
        if host_if_name in self.taps.values():
            return NS(retval=-79)
        index = self._new_iface(f"tap{self.next_index}", "tap", mac=mac_address)
        self.taps[index] = host_if_name
        return NS(retval=0, sw_if_index=index)

    def m_tap_delete_v2(self, sw_if_index: int) -> Any:
        if self.taps.pop(sw_if_index, None) is None:
            return NS(retval=INVALID_SW_IF_INDEX)
        self._delete_iface(sw_if_index)
        return NS(retval=0)

    def m_sw_interface_set_rx_mode(self, sw_if_index: int, queue_id_valid: bool,
                                   queue_id: int, mode: int) -> Any:
        if err := self._check(sw_if_index):
            return NS(retval=err)
        iface = self.ifaces[sw_if_index]
        if mode == RX_MODE_ADAPTIVE and iface["dev_type"] == "af-packet":
            return NS(retval=-9)  # VPP 26.06's af_packet has no adaptive mode
        iface["rx_mode"] = mode
        return NS(retval=0)

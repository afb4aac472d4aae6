"""Crypto engines: which ones VPP loaded, which runs AES-GCM-256, and choosing one.

VPP runs each algorithm on one engine, picked at start by engine priority (native 100,
ipsecmb 80, openssl 50). The native engine itself contains several builds of its AES-GCM
code, one per instruction set, and takes the best its build has for the CPU: VAES with
AVX-512 (priority 50 of its own), VAES on 256-bit vectors (40), AVX-512 without VAES
(30), AVX2 (20), AES-NI only (10). VPP 26.06's generic build (FD.io's packages) compiles
only the AVX2 and AES-NI ones (src/crypto_engines/native/CMakeLists.txt gates the others
on compiler checks that it no longer runs), so on a VAES CPU the native engine runs its
AVX2 code at about half the speed the CPU allows. VPP says which variant it took only in
a debug log line of class crypto/main (vppmesh's startup profiles turn it on), and has
no API message to list engines or handlers: those are read from the CLI.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from vppmesh.dataplane.vpp.client import Request, VppApi

# vppmesh's SAs (AES-GCM-256 with ESN) run VPP's algorithm with a 16-byte ICV and 12 bytes
# of AAD (SPI and the 64-bit sequence number; ipsec_sa.c, esn_alg).
ALG = "aes-256-gcm-icv16-aad12"
OP_SIMPLE = 0  # CRYPTO_API_OP_SIMPLE: single-buffer packets
OP_CHAINED = 1  # CRYPTO_API_OP_CHAINED: packets in buffer chains
ANSI_RE = re.compile(r"\x1b\[[0-9;]*m")
SELECTED_RE = re.compile(r"engine (?P<engine>\S+) selected group (?P<group>\S+) "
                         r"priority=(?P<priority>\d+)")
# The native engine's AES-GCM variants, by the priority its probe gives them (aes_gcm.c).
NATIVE_GCM_VARIANTS = {
    50: "vaes-avx512", 40: "vaes-avx2", 30: "avx512", 20: "avx2", 10: "aes-ni",
}
VAES_VARIANTS = {"vaes-avx512", "vaes-avx2"}


@dataclass(frozen=True)
class Engine:
    name: str
    priority: int
    description: str


@dataclass(frozen=True)
class Handlers:
    """The engines that can run an algorithm's encrypt op, and the active ones.

    Single-buffer packets (all of vppmesh's at an MTU of 1500) take the simple handler;
    the chained one serves buffer chains. Not every engine has both: VPP 26.06's native
    engine has no chained AES-GCM, so there ipsecmb or openssl stays active.
    """

    simple: str | None
    chained: str | None
    candidates: tuple[str, ...]
    chained_candidates: tuple[str, ...] = ()


def set_handler(engine: str, alg: str = ALG, *, chained: bool = False) -> Request:
    """Run `alg`'s simple (or chained) synchronous ops on `engine`."""
    kind = "chained" if chained else "simple"
    return Request("crypto_set_handler", {"alg_name": alg, "engine": engine,
                                          "oct": OP_CHAINED if chained else OP_SIMPLE,
                                          "is_async": 0},
                   f"crypto handler {alg} ({kind}) -> {engine}")


def parse_engines(text: str) -> list[Engine]:
    """`show crypto engines`: name, priority, description per line after the header."""
    engines = []
    for line in ANSI_RE.sub("", text).splitlines():
        parts = line.split(None, 2)
        if len(parts) >= 2 and parts[1].isdigit():
            engines.append(Engine(parts[0], int(parts[1]), parts[2] if len(parts) > 2 else ""))
    return engines


def parse_handlers(text: str, alg: str = ALG) -> Handlers | None:
    """`show crypto handlers`, the encrypt row of `alg`: cells are separated by two or
    more spaces, engines in a cell by one, and the active one ends in `*`."""
    for line in ANSI_RE.sub("", text).splitlines():
        cells = re.split(r"\s{2,}", line.strip())
        if len(cells) >= 4 and cells[0] == alg and cells[1] == "enc":
            simple, chained = cells[2].split(), cells[3].split()
            return Handlers(simple=_active(simple), chained=_active(chained),
                            candidates=_names(simple), chained_candidates=_names(chained))
    return None


def _names(cell: list[str]) -> tuple[str, ...]:
    return tuple(e.rstrip("*") for e in cell if e != "-")


def _active(engines: list[str]) -> str | None:
    return next((e.rstrip("*") for e in engines if e.endswith("*")), None)


def parse_native_variant(log_text: str, alg_group: str = "native_gcm256_group") -> str | None:
    """The AES-GCM code the native engine took, from its crypto/main debug log line."""
    for m in SELECTED_RE.finditer(ANSI_RE.sub("", log_text)):
        if m.group("engine") == "native" and m.group("group") == alg_group:
            return NATIVE_GCM_VARIANTS.get(int(m.group("priority")), f"priority {m['priority']}")
    return None


@dataclass(frozen=True)
class CryptoState:
    engines: tuple[Engine, ...]
    handlers: Handlers | None
    native_variant: str | None  # None: not logged (crypto/main debug logging is off)

    @property
    def active(self) -> str | None:
        return self.handlers.simple if self.handlers else None

    def as_dict(self) -> dict[str, object]:
        return {"engines": [e.name for e in self.engines], "active": self.active,
                "candidates": list(self.handlers.candidates) if self.handlers else [],
                "chained": self.handlers.chained if self.handlers else None,
                "native_variant": self.native_variant}


def cli(api: VppApi, command: str) -> str:
    return str(api.call(Request("cli_inband", {"cmd": command}, command)).reply)


def read_handlers(api: VppApi) -> Handlers | None:
    return parse_handlers(cli(api, "show crypto handlers"))


def read_native_variant(api: VppApi) -> str | None:
    return parse_native_variant(cli(api, "show logging"))


def read_state(api: VppApi) -> CryptoState:
    return CryptoState(engines=tuple(parse_engines(cli(api, "show crypto engines"))),
                       handlers=read_handlers(api), native_variant=read_native_variant(api))

"""Which crypto engine runs vppmesh's AES-GCM-256, and why.

VPP picks an engine per algorithm by engine priority, whatever the CPU: native (100)
before ipsecmb (80) and openssl (50). That is the right choice only when the native
engine's build has AES-GCM code for the CPU's widest AES instructions. VPP 26.06's
generic build (FD.io's packages) has no VAES code in its native engine (see
vppmesh/dataplane/vpp/crypto.py), so on a CPU with VAES the native engine runs 128-bit AES-NI code
at about half the speed of the ipsecmb engine, which carries VAES code of its own and
picks it at run time (benchmarks/README.md, capacity: measured on the same machine).

`auto` therefore takes, in this order: the native engine when it runs VAES code; the
ipsecmb engine when the CPU has VAES; the native engine; whatever VPP chose. An operator
can name an engine instead (`vppmesh up --crypto-engine ipsecmb`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from vppmesh.dataplane.reconcile import Change
from vppmesh.dataplane.vpp import crypto
from vppmesh.dataplane.vpp.client import VppApi
from vppmesh.errors import ConfigError

AUTO = "auto"


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    try:
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def host_has_vaes(flags: frozenset[str]) -> bool:
    return {"vaes", "vpclmulqdq"} <= flags


def choose(candidates: tuple[str, ...], native_variant: str | None,
           flags: frozenset[str], current: str | None) -> str | None:
    """The `auto` engine for AES-GCM-256 (None: leave VPP's choice)."""
    if "native" in candidates and native_variant in crypto.VAES_VARIANTS:
        return "native"
    if "ipsecmb" in candidates and host_has_vaes(flags):
        return "ipsecmb"
    if "native" in candidates:
        return "native"
    return current


def warning(active: str | None, native_variant: str | None,
            flags: frozenset[str]) -> str | None:
    """Why the host's AES is not used at full width, if it is not."""
    if not host_has_vaes(flags):
        return None
    if active == "native" and native_variant is not None and \
            native_variant not in crypto.VAES_VARIANTS:
        return (f"this CPU has VAES, but VPP's native crypto engine runs its {native_variant} "
                "code (its build has no VAES variant): load the ipsecmb engine "
                "(crypto-engines { ipsecmb { enable } }) or use a VPP built with the VAES "
                "variants (README: Crypto engines)")
    if active not in ("native", "ipsecmb"):
        return (f"this CPU has VAES, but AES-GCM-256 runs on the {active} engine: load the "
                "ipsecmb engine or a native engine built with VAES (README: Crypto engines)")
    return None


@dataclass(frozen=True)
class Choice:
    """What `ensure` did: the handler changes, the engine now in use, and a warning when
    that engine leaves the CPU's VAES unused."""

    changes: list[Change]
    engine: str | None
    warning: str | None = None


_VARIANTS: dict[int, str | None] = {}  # VPP process id -> native variant (fixed per process)


def _native_variant(api: VppApi, vpp_pid: int | None) -> str | None:
    """The native engine's variant; read from VPP's log once per VPP process, since the
    agent asks again at every full resync and the log holds thousands of entries."""
    if vpp_pid is None:
        return crypto.read_native_variant(api)
    if vpp_pid not in _VARIANTS:
        _VARIANTS.clear()  # one VPP per agent: an older process's entry is stale
        _VARIANTS[vpp_pid] = crypto.read_native_variant(api)
    return _VARIANTS[vpp_pid]


def ensure(api: VppApi, wanted: str, *, dry_run: bool = False,
           flags: frozenset[str] | None = None, vpp_pid: int | None = None) -> Choice:
    """Make `wanted` (an engine name, or auto) run vppmesh's AES-GCM-256."""
    handlers = crypto.read_handlers(api)
    if handlers is None or not handlers.candidates:
        # SAs would still be created, and every packet dropped for want of an engine.
        raise ConfigError(
            f"VPP has no crypto engine for {crypto.ALG} (AES-GCM-256): install FD.io's "
            "vpp-crypto-engines package and enable an engine in startup.conf "
            "(crypto-engines { native { enable } ipsecmb { enable } }; `vppmesh "
            "render-startup` writes that)")
    flags = cpu_flags() if flags is None else flags
    variant = None
    if wanted == AUTO:
        # The native engine's variant decides only between native and ipsecmb on a VAES
        # CPU; reading it means reading VPP's whole log, so only then.
        if {"native", "ipsecmb"} <= set(handlers.candidates) and host_has_vaes(flags):
            variant = _native_variant(api, vpp_pid)
        engine = choose(handlers.candidates, variant, flags, handlers.simple)
    else:
        if wanted not in handlers.candidates:
            have = ", ".join(handlers.candidates) or "none"
            raise ConfigError(
                f"--crypto-engine {wanted}: VPP has no {wanted} engine for {crypto.ALG} "
                f"(it has: {have}); enable it in startup.conf (crypto-engines {{ {wanted} "
                "{ enable } }) or pick one of those")
        engine = wanted
    if engine is None:
        return Choice([], handlers.simple)
    if engine == "native" and variant is None and host_has_vaes(flags):
        variant = _native_variant(api, vpp_pid)
    requests = []
    if engine != handlers.simple:
        requests.append(crypto.set_handler(engine))
    if engine in handlers.chained_candidates and engine != handlers.chained:
        requests.append(crypto.set_handler(engine, chained=True))
    if requests and not dry_run:
        api.call_many(requests)
    return Choice([Change("update", "crypto handler", r.what.removeprefix("crypto handler "))
                   for r in requests], engine, warning(engine, variant, flags))

"""Crypto engine choice: parsing VPP's crypto CLI, the auto rule, applying it in `up`."""

from __future__ import annotations

from pathlib import Path

import pytest

from vppmesh.dataplane import engines
from vppmesh.dataplane.vpp import crypto
from vppmesh.errors import ConfigError
from vppmesh.ops.status import crypto_status
from vppmesh.testing.fake_vpp import FakeVpp

DATA = Path(__file__).parent / "data"
VAES = frozenset({"aes", "avx2", "vaes", "vpclmulqdq"})
NO_VAES = frozenset({"aes", "avx2", "pclmulqdq"})


def test_parse_real_handlers_table() -> None:
    handlers = crypto.parse_handlers((DATA / "show_crypto_handlers.txt").read_text())
    assert handlers is not None
    assert handlers.simple in handlers.candidates
    assert {"native", "openssl"} <= set(handlers.candidates)


def test_parse_real_engines_and_log() -> None:
    names = [e.name for e in crypto.parse_engines((DATA / "show_crypto_engines.txt").read_text())]
    assert "native" in names and "openssl" in names
    variant = crypto.parse_native_variant((DATA / "show_logging_crypto.txt").read_text())
    assert variant in crypto.NATIVE_GCM_VARIANTS.values()


def test_parse_ignores_colour_codes() -> None:
    text = ("Algorithm   Op   Simple   Chained   Async\n"
            "aes-256-gcm-icv16-aad12  enc  \x1b[36mnative*\x1b[0m openssl  "
            "\x1b[36mipsecmb*\x1b[0m openssl  crypto_sw_scheduler*\n")
    handlers = crypto.parse_handlers(text)
    assert handlers == crypto.Handlers("native", "ipsecmb", ("native", "openssl"),
                                       ("ipsecmb", "openssl"))
    assert crypto.parse_native_variant("nothing logged") is None


@pytest.mark.parametrize(("candidates", "variant", "flags", "expected"), [
    (("native", "ipsecmb", "openssl"), "vaes-avx512", VAES, "native"),
    (("native", "ipsecmb", "openssl"), "vaes-avx2", VAES, "native"),
    (("native", "ipsecmb", "openssl"), "avx2", VAES, "ipsecmb"),
    (("native", "ipsecmb", "openssl"), None, VAES, "ipsecmb"),
    (("native", "ipsecmb", "openssl"), "avx2", NO_VAES, "native"),
    (("native", "openssl"), "avx2", VAES, "native"),
    (("openssl",), None, VAES, "openssl"),
])
def test_auto_rule(candidates: tuple[str, ...], variant: str | None, flags: frozenset[str],
                   expected: str) -> None:
    assert engines.choose(candidates, variant, flags, current=candidates[0]) == expected


def test_ensure_auto_moves_gcm_to_ipsecmb_on_a_vaes_cpu_with_a_generic_build() -> None:
    vpp = FakeVpp()
    vpp.native_gcm_priority = 20  # the AVX2 code: all a generic 26.06 build has
    choice = engines.ensure(vpp, "auto", flags=VAES)  # type: ignore[arg-type]
    assert choice.engine == "ipsecmb" and vpp.crypto_active == "ipsecmb"
    assert choice.warning is None
    # Single-buffer ops move; chained ones were on ipsecmb already.
    assert [str(c) for c in choice.changes] == [
        "~ crypto handler aes-256-gcm-icv16-aad12 (simple) -> ipsecmb"]
    # A second run changes nothing.
    assert engines.ensure(vpp, "auto", flags=VAES) == engines.Choice(  # type: ignore[arg-type]
        [], "ipsecmb")


def test_ensure_auto_keeps_native_with_vaes_code() -> None:
    vpp = FakeVpp()
    vpp.native_gcm_priority = 50
    assert engines.ensure(vpp, "auto", flags=VAES) == engines.Choice(  # type: ignore[arg-type]
        [], "native")
    assert vpp.counts["crypto_set_handler"] == 0


def test_native_variant_is_read_from_the_log_once_per_vpp_process(
        monkeypatch: pytest.MonkeyPatch) -> None:
    vpp = FakeVpp()
    vpp.native_gcm_priority = 50
    reads = []
    real = crypto.read_native_variant
    monkeypatch.setattr(crypto, "read_native_variant",
                        lambda api: reads.append(1) or real(api))
    for pid in (101, 101, 101, 202):
        assert engines.ensure(vpp, "auto", flags=VAES,  # type: ignore[arg-type]
                              vpp_pid=pid).engine == "native"
    assert len(reads) == 2  # once for VPP 101, once for its successor 202
    engines.ensure(vpp, "auto", flags=VAES)  # type: ignore[arg-type]
    assert len(reads) == 3  # no process id: read every time


def test_ensure_warns_when_the_named_engine_leaves_vaes_unused() -> None:
    vpp = FakeVpp()
    vpp.native_gcm_priority = 20
    choice = engines.ensure(vpp, "native", flags=VAES)  # type: ignore[arg-type]
    assert choice.changes == [] and choice.warning and "avx2" in choice.warning
    assert engines.ensure(vpp, "native", flags=NO_VAES).warning is None  # type: ignore[arg-type]


def test_ensure_named_engine_and_dry_run() -> None:
    vpp = FakeVpp()
    choice = engines.ensure(vpp, "openssl", dry_run=True)  # type: ignore[arg-type]
    assert choice.engine == "openssl" and len(choice.changes) == 2
    assert vpp.crypto_active == "native"
    engines.ensure(vpp, "openssl")  # type: ignore[arg-type]
    assert (vpp.crypto_active, vpp.crypto_chained) == ("openssl", "openssl")
    # native has no chained AES-GCM: only the single-buffer ops move back.
    choice = engines.ensure(vpp, "native")  # type: ignore[arg-type]
    assert len(choice.changes) == 1
    assert (vpp.crypto_active, vpp.crypto_chained) == ("native", "openssl")


def test_ensure_unknown_engine_names_the_option_and_the_fix() -> None:
    vpp = FakeVpp()
    vpp.crypto_engines = ["native", "openssl"]
    with pytest.raises(ConfigError, match=r"--crypto-engine ipsecmb.*it has: native, openssl"):
        engines.ensure(vpp, "ipsecmb")  # type: ignore[arg-type]
    assert vpp.crypto_active == "native"


@pytest.mark.parametrize("wanted", ["auto", "native"])
def test_no_engine_for_aes_gcm_is_an_error_naming_the_package(wanted: str) -> None:
    vpp = FakeVpp()
    vpp.crypto_engines = []  # VPP 26.06 without vpp-crypto-engines: every cell is "-"
    with pytest.raises(ConfigError, match=r"no crypto engine.*vpp-crypto-engines"):
        engines.ensure(vpp, wanted, flags=VAES)  # type: ignore[arg-type]


def test_status_warns_when_vaes_goes_unused() -> None:
    vpp = FakeVpp()
    vpp.native_gcm_priority = 20
    status = crypto_status(vpp, flags=VAES)  # type: ignore[arg-type]
    assert status is not None and status.engine == "native"
    assert status.native_variant == "avx2" and status.cpu_vaes
    assert status.warning is not None and "VAES" in status.warning
    vpp.crypto_active = "ipsecmb"
    assert crypto_status(vpp, flags=VAES).warning is None  # type: ignore[arg-type, union-attr]
    vpp.crypto_active = "native"
    assert crypto_status(vpp, flags=NO_VAES).warning is None  # type: ignore[arg-type, union-attr]


def test_cpu_flags_reads_cpuinfo(tmp_path: Path) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu aes avx2 vaes vpclmulqdq\n")
    flags = engines.cpu_flags(info)
    assert engines.host_has_vaes(flags) and "aes" in flags
    assert engines.cpu_flags(tmp_path / "missing") == frozenset()

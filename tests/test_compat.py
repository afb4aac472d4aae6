"""The checks made at every connect: VPP's release and the CRCs of the messages used."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from vppmesh.dataplane.vpp import compat
from vppmesh.dataplane.vpp.compat import VppIncompatibleError

ROOT = Path(__file__).resolve().parent.parent
API_DIR = Path("/opt/vpp/share/vpp/api")


def messages_named_in_code() -> set[str]:
    """Every message vppmesh/ sends or dumps: Request("name", ...), .dump("name", ...)
    and channel exchanges (("name", {...}) tuples handed to exchange/dump)."""
    found: set[str] = set()
    for path in (ROOT / "vppmesh").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call) or not node.args:
                continue
            first = node.args[0]
            func = node.func
            name = func.id if isinstance(func, ast.Name) else \
                func.attr if isinstance(func, ast.Attribute) else ""
            if name in ("Request", "dump") and isinstance(first, ast.Constant) \
                    and isinstance(first.value, str):
                found.add(first.value)
            if name == "exchange" and isinstance(first, ast.List):
                for item in first.elts:
                    if isinstance(item, ast.Tuple) and isinstance(item.elts[0], ast.Constant):
                        found.add(item.elts[0].value)
    # The handshake's own messages (memclnt) are fixed by VPP and not checked.
    return found - {"get_api_json", "sockclnt_delete"}


def test_every_message_the_code_uses_has_a_crc() -> None:
    used = messages_named_in_code()
    assert {"ipsec_sad_entry_add_v2", "ipip_add_tunnel", "show_version"} <= used
    missing = sorted(used - set(compat.CRCS))
    fix = f"python -m vppmesh.dataplane.vpp.compat API_DIR {' '.join(missing)}"
    assert not missing, f"add these to compat.CRCS ({fix}): {missing}"


def test_crcs_are_the_installed_vpps() -> None:
    if not API_DIR.is_dir():
        pytest.skip(f"no VPP API definitions at {API_DIR}")
    requests = [n for n in compat.CRCS if not n.endswith(("_reply", "_details"))]
    assert compat.crcs_from_api_json(API_DIR, requests) == compat.CRCS


def test_release_of_version_strings() -> None:
    assert compat.release("26.06-release") == "26.06"
    assert compat.release("v26.06-rc0~12-gabcdef") == "26.06"
    assert compat.release("26.06.1-release") == "26.06"
    assert compat.release("25.10-release") == "25.10"


def test_untested_release_is_refused_with_the_way_out() -> None:
    assert compat.check_version("26.06-release", {}) is None
    with pytest.raises(VppIncompatibleError) as exc:
        compat.check_version("25.10-release", {})
    text = str(exc.value)
    assert "25.10-release" in text and "26.06" in text and compat.UNTESTED_ENV in text
    warning = compat.check_version("25.10-release", {compat.UNTESTED_ENV: "1"})
    assert warning is not None and "25.10" in warning


def test_changed_message_is_refused_and_named() -> None:
    table = [f"{name}_{crc[2:]}" for name, crc in compat.CRCS.items()]
    vpp = compat.message_crcs(table)
    assert vpp == compat.CRCS
    compat.check_messages(vpp, "26.06-release")
    # A plugin that is not loaded is no error at connect.
    compat.check_messages({k: v for k, v in vpp.items() if not k.startswith("af_xdp")},
                          "26.06-release")
    vpp["ipsec_sad_entry_add_v2"] = "0xdeadbeef"
    with pytest.raises(VppIncompatibleError, match=r"ipsec_sad_entry_add_v2 \(VPP 0xdeadbeef"):
        compat.check_messages(vpp, "26.06-release")

"""Validation errors as an operator reads them: the field as written, the value, the fix.

pydantic's own locations carry the internals of a union ("underlay.0.lax-or-strict[lax=
function-plain[ip_v4_interface_validator()], ...]") and report one error per member of
the union ("not a valid IPv4 interface", "not a valid IPv6 interface"). Every place that
turns a ValidationError into a message (mesh file, datastore records, startup profiles,
the CNI configuration, command-line options) goes through `problems()`, which keeps the
field names and indexes, merges the errors of one union into one, and names the value.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pydantic import ValidationError

_FIELD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_NOT_A_VALID_IP = re.compile(r"Input is not a valid (IPv[46]) (interface|address|network)")
_KINDS = {"interface": "address with prefix length", "address": "address",
          "network": "network"}
_EXAMPLES = {
    "interface": {"IPv4": "192.0.2.11/24", "IPv6": "2001:db8::11/64"},
    "address": {"IPv4": "192.0.2.11", "IPv6": "2001:db8::11"},
    "network": {"IPv4": "198.18.1.0/24", "IPv6": "2001:db8:1::/64"},
}


def _where(loc: tuple[Any, ...]) -> tuple[str | int, ...]:
    """Field names and list indexes only: union member tags are pydantic's, not the user's."""
    return tuple(p for p in loc if isinstance(p, int) or _FIELD.fullmatch(str(p)))


def _message(errors: list[dict[str, Any]]) -> str:
    messages = list(dict.fromkeys(str(e["msg"]).removeprefix("Value error, ") for e in errors))
    ip = [m for m in map(_NOT_A_VALID_IP.fullmatch, messages) if m]
    if ip and len(ip) == len(messages):
        families = list(dict.fromkeys(m.group(1) for m in ip))
        kind = ip[0].group(2)
        examples = " or ".join(_EXAMPLES[kind][f] for f in families)
        return (f"{errors[0].get('input')!r} is not a valid {' or '.join(families)} {_KINDS[kind]} "
                f"(e.g. {examples})")
    return "; or ".join(messages)


def problems(exc: ValidationError) -> list[tuple[tuple[str | int, ...], str]]:
    """(location, message) per problem, the errors of one union merged into one."""
    entries: list[tuple[tuple[str | int, ...], list[dict[str, Any]]]] = []
    unions: dict[tuple[str | int, ...], list[dict[str, Any]]] = {}
    for err in exc.errors():
        where = _where(err["loc"])
        if where == tuple(err["loc"]):
            entries.append((where, [dict(err)]))
        elif where in unions:  # another member of the same union
            unions[where].append(dict(err))
        else:
            unions[where] = [dict(err)]
            entries.append((where, unions[where]))
    return [(where, _message(errors)) for where, errors in entries]


def dotted(where: tuple[str | int, ...]) -> str:
    return ".".join(str(p) for p in where) or "(top level)"


def describe(exc: ValidationError, *, sep: str = "; ",
             name: Callable[[tuple[str | int, ...]], str] = dotted) -> str:
    """`where: problem` per problem, joined by `sep`."""
    return sep.join(f"{name(where)}: {message}" for where, message in problems(exc))


def option_name(renames: Mapping[str, str] | None = None) -> Callable[[tuple[str | int, ...]],
                                                                      str]:
    """Locations spelled as command-line options (`--vpp-addresses` -> `--address`)."""
    def name(where: tuple[str | int, ...]) -> str:
        if not where:
            return "(options)"
        field = str(where[0])
        option = (renames or {}).get(field, field.replace("_", "-"))
        index = "".join(f"[{p}]" for p in where[1:] if isinstance(p, int))
        return f"--{option}{index}"
    return name

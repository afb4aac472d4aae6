"""Fast encoding of VPP API requests, compiled from vpp-papi's own definitions.

The counterpart of decoder.py: encoding a 1000-peer mesh field by field through
vpp-papi costs more CPU than VPP spends applying it (a route carries 4 paths of 16
MPLS labels each). A generated function packs each run of fixed-size fields with one
precompiled struct, with vpp-papi's rules: missing or None fields take their default,
strings and byte arrays are bounds-checked and zero-padded, list lengths must match.
Fields vpp-papi converts from Python objects (addresses, prefixes, MAC addresses) and
unions are packed by vpp-papi itself, so every accepted input form stays accepted. The
tests compare both encoders byte for byte.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

from vpp_papi import vpp_format
from vpp_papi.vpp_serializer import (
    BaseTypes,
    FixedList,
    FixedList_u8,
    String,
    VLAList,
    VPPEnumType,
    VPPSerializerValueError,
    VPPType,
    VPPTypeAlias,
    VPPUnionType,
)

from vppmesh.dataplane.vpp.decoder import BASE_FORMATS, Unsupported

Encoder = Callable[[dict[str, Any]], bytes]


def _default(value: Any, default: Any) -> Any:
    return default if value is None else value


def _fixed_bytes(value: Any, size: int, name: str) -> bytes:
    if not value:
        return b""
    if len(value) > size:
        raise VPPSerializerValueError(f"{name}: {len(value)} bytes, at most {size}")
    return bytes(value)


def _fixed_string(value: Any, limit: int, name: str) -> bytes:
    if not value:
        return b""
    if limit and len(value) > limit - 1:
        raise VPPSerializerValueError(f"{name}: longer than {limit - 1} characters")
    return bytes(value.encode("ascii"))


def _fixed_list(value: Any, size: int, name: str) -> Any:
    if value is None or len(value) != size:
        raise VPPSerializerValueError(f"{name}: needs exactly {size} elements")
    return value


def _variable_list(value: Any, count: Any, name: str) -> Any:
    if not value:
        return ()
    if len(value) != count:
        raise VPPSerializerValueError(f"{name}: {len(value)} elements but count {count}")
    return value


HELPERS = {"_pack": struct.pack, "_default": _default, "_fixed_bytes": _fixed_bytes,
           "_fixed_string": _fixed_string, "_fixed_list": _fixed_list,
           "_variable_list": _variable_list}


class _Function:
    def __init__(self, env: dict[str, Any]) -> None:
        self.env = env
        self.lines: list[str] = []
        self.formats: list[str] = []
        self.values: list[str] = []
        self.temps = 0

    def name(self, prefix: str, value: Any) -> str:
        key = f"{prefix}{len(self.env)}"
        self.env[key] = value
        return key

    def temp(self, expr: str) -> str:
        self.temps += 1
        var = f"t{self.temps}"
        self.lines.append(f"{var} = {expr}")
        return var

    def leaf(self, fmt: str, expr: str) -> None:
        self.formats.append(fmt)
        self.values.append(expr)

    def flush(self) -> None:
        if not self.formats:
            return
        packer = self.name("S", struct.Struct(">" + "".join(self.formats)))
        self.lines.append(f"parts.append({packer}.pack({', '.join(self.values)}))")
        self.formats, self.values = [], []

    def source(self, name: str) -> str:
        self.flush()
        body = "\n".join(f"    {line}" for line in self.lines)
        return f"def {name}(d):\n    parts = []\n{body}\n    return b''.join(parts)\n"


class _Compiler:
    def __init__(self) -> None:
        self.env: dict[str, Any] = dict(HELPERS)
        self.count = 0

    def function(self, packer: VPPType) -> Callable[[Any], bytes]:
        fn = _Function(self.env)
        self.struct_fields(fn, packer, "d")
        self.count += 1
        name = f"encode_{self.count}"
        exec(fn.source(name), self.env)
        return self.env[name]  # type: ignore[no-any-return]

    def struct_fields(self, fn: _Function, packer: VPPType, var: str) -> None:
        for field_name, field_packer in zip(packer.fields, packer.packers, strict=True):
            value = f"{var}.get({field_name!r})"
            self.field(fn, field_packer, value, var, f"{packer.name}.{field_name}")

    def papi(self, fn: _Function, packer: Any, value: str) -> None:
        """Let vpp-papi pack this part (conversions, unions): same bytes, same errors."""
        fn.leaf(f"{packer.size}s", f"{fn.name('P', packer)}.pack({value})")

    def field(self, fn: _Function, packer: Any, value: str, parent: str, name: str) -> None:
        options = getattr(packer, "options", None) or {}
        default = options.get("default", 0)
        if isinstance(packer, VPPEnumType):
            fn.leaf(BASE_FORMATS[packer.enumtype], f"_default({value}, {default!r})")
        elif isinstance(packer, BaseTypes):
            if packer._elements > 0 or packer._type == "string":
                fn.leaf(f"{packer.size}s", f"_fixed_bytes({value}, {packer.size}, {name!r})")
            elif packer._type in BASE_FORMATS:
                fn.leaf(BASE_FORMATS[packer._type], f"_default({value}, {default!r})")
            else:
                raise Unsupported(packer._type)
        elif isinstance(packer, FixedList_u8):
            fn.leaf(f"{packer.num}s", f"_fixed_bytes({value}, {packer.num}, {name!r})")
        elif isinstance(packer, String):
            if not packer.fixed or packer.limit != packer.num:
                raise Unsupported("variable-length string")
            fn.leaf(f"{packer.num}s", f"_fixed_string({value}, {packer.limit}, {name!r})")
        elif isinstance(packer, FixedList):
            items = fn.temp(f"_fixed_list({value}, {packer.num}, {name!r})")
            for i in range(packer.num):
                self.field(fn, packer.packer, f"{items}[{i}]", parent, f"{name}[{i}]")
        elif isinstance(packer, VLAList):
            if packer.packer.size == 1 and packer.field_type == "u8":
                raise Unsupported("variable-length byte list")
            items = fn.temp(f"_variable_list({value}, {parent}.get({packer.length_field!r}), "
                            f"{name!r})")
            fn.flush()
            base = packer.packer
            if isinstance(base, VPPTypeAlias) and not self.converted(base):
                base = base.packer
            if isinstance(base, BaseTypes) and base._elements == 0 and \
                    base._type in BASE_FORMATS:
                fmt = BASE_FORMATS[base._type]
                fn.lines.append(f"parts.append(_pack('>%d{fmt}' % len({items}), *{items}))")
            elif isinstance(base, VPPType) and not self.converted(base):
                element = fn.name("F", self.function(base))
                fn.lines.append(f"parts.extend(map({element}, {items}))")
            else:
                raise Unsupported("list of converted elements")
        elif isinstance(packer, VPPTypeAlias | VPPUnionType):
            if isinstance(packer, VPPUnionType) or self.converted(packer):
                self.papi(fn, packer, value)
            else:
                alias_default = options.get("default")
                inner = value if alias_default is None else f"_default({value}, " \
                    f"{alias_default!r})"
                self.field(fn, packer.packer, inner, parent, name)
        elif isinstance(packer, VPPType):
            if self.converted(packer):
                self.papi(fn, packer, value)
            else:
                sub = fn.temp(f"{value} or {{}}")
                self.struct_fields(fn, packer, sub)
        else:
            raise Unsupported(type(packer).__name__)

    @staticmethod
    def converted(packer: Any) -> bool:
        return packer.name in vpp_format.conversion_table


def compile_encoder(message: Any) -> Encoder | None:
    """A fast encoder for one message definition, or None to keep vpp-papi's."""
    try:
        return _Compiler().function(message)
    except (Unsupported, AttributeError, KeyError, struct.error):
        return None

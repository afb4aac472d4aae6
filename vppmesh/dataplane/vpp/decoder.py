"""Fast decoding of VPP API messages, compiled from vpp-papi's own definitions.

vpp-papi decodes a message field by field, one Python call and one struct.unpack per
leaf, which makes dumping a large mesh (8,000 SAs, 1,000 four-path routes) cost most of
a second of CPU. This module turns a message definition into a generated function that
reads each run of fixed-size fields with a single precompiled struct and builds the very
same result: vpp-papi's named tuples, enums, addresses and strings, field for field
(the tests compare both decoders on real VPP messages). A message with a field it does
not handle (variable-length strings, floats) is left to vpp-papi.
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
    VPPType,
    VPPTypeAlias,
    VPPUnionType,
)

Decoder = Callable[[bytes], Any]
BASE_FORMATS = {"u8": "B", "i8": "b", "u16": "H", "i16": "h", "u32": "I", "i32": "i",
                "u64": "Q", "i64": "q", "bool": "?"}


class Unsupported(Exception):
    """The definition has a field this compiler does not handle; use vpp-papi."""


class _Function:
    """One generated function: statements that read segments, then one expression."""

    def __init__(self, env: dict[str, Any]) -> None:
        self.env = env
        self.lines: list[str] = []
        self.formats: list[str] = []  # the open segment's struct format
        self.segments = 0
        self.variables = 0

    def name(self, prefix: str, value: Any) -> str:
        key = f"{prefix}{len(self.env)}"
        self.env[key] = value
        return key

    def leaf(self, fmt: str) -> str:
        """An expression reading the next `fmt` field of the open segment."""
        self.formats.append(fmt)
        return f"s{self.segments}[{len(self.formats) - 1}]"

    def flush(self) -> None:
        """Read the open segment now (a variable-length field follows it)."""
        if not self.formats:
            return
        packer = struct.Struct(">" + "".join(self.formats))
        name = self.name("S", packer)
        self.lines.append(f"s{self.segments} = {name}.unpack_from(data, off)")
        self.lines.append(f"off += {packer.size}")
        self.segments += 1
        self.formats = []

    def variable(self) -> str:
        self.variables += 1
        return f"v{self.variables}"

    def source(self, name: str, result: str, returns_size: bool) -> str:
        self.flush()
        body = "\n".join(f"    {line}" for line in self.lines)
        end = f"({result}, off - start)" if returns_size else result
        return f"def {name}(data, off=0):\n    start = off\n{body}\n    return {end}\n"


class _Compiler:
    def __init__(self) -> None:
        self.env: dict[str, Any] = {}
        self.count = 0

    def function(self, packer: Any, ntc: bool, returns_size: bool) -> Callable[..., Any]:
        fn = _Function(self.env)
        result = self.value(fn, packer, ntc)
        self.count += 1
        name = f"decode_{self.count}"
        exec(fn.source(name, result, returns_size), self.env)
        return self.env[name]  # type: ignore[no-any-return]

    def fixed_function(self, packer: Any, ntc: bool) -> tuple[str, int]:
        """A generated (data, off) -> value for a fixed-size type, and its size."""
        fn = _Function(self.env)
        result = self.value(fn, packer, ntc)
        if fn.segments:  # it had to read a variable-length part: not fixed-size
            raise Unsupported("variable-length element")
        size = struct.calcsize(">" + "".join(fn.formats))
        self.count += 1
        name = f"decode_{self.count}"
        exec(fn.source(name, result, False), self.env)
        return name, size

    def value(self, fn: _Function, packer: Any, ntc: bool,
              siblings: list[str] | None = None) -> str:
        """Code for one field; `siblings` are the exprs of earlier fields of its struct."""
        if isinstance(packer, VPPEnumType):  # before VPPType checks: enums are Packers
            inner = self.value(fn, BaseTypes(packer.enumtype), ntc)
            return f"{fn.name('E', packer.enum)}({inner})"
        if isinstance(packer, BaseTypes):
            if packer._elements > 0 or packer._type == "string":
                return fn.leaf(f"{packer.size}s")
            if packer._type not in BASE_FORMATS:
                raise Unsupported(packer._type)
            return fn.leaf(BASE_FORMATS[packer._type])
        if isinstance(packer, FixedList_u8):
            return fn.leaf(f"{packer.num}s")
        if isinstance(packer, String):
            if not packer.fixed:
                raise Unsupported("variable-length string")
            return f"{fn.leaf(f'{packer.num}s')}.split(b'\\0', 1)[0].decode('ascii')"
        if isinstance(packer, FixedList):
            items = [self.value(fn, packer.packer, ntc) for _ in range(packer.num)]
            return "[" + ", ".join(items) + "]"
        if isinstance(packer, VLAList):
            if siblings is None:
                raise Unsupported("variable-length list outside a struct")
            count = siblings[packer.index]
            fn.flush()
            out = fn.variable()
            if packer.packer.size == 1 and packer.field_type == "u8":
                fn.lines.append(f"{out} = bytes(data[off:off + {count}])")
                fn.lines.append(f"off += {count}")
                return out
            element, size = self.fixed_function(packer.packer, ntc)
            fn.lines.append(f"{out} = [{element}(data, off + i * {size}) "
                            f"for i in range({count})]")
            fn.lines.append(f"off += {count} * {size}")
            return out
        if isinstance(packer, VPPTypeAlias):
            convert = not ntc and packer.name in vpp_format.conversion_unpacker_table
            inner = self.value(fn, packer.packer, ntc or convert)
            if convert:
                table = vpp_format.conversion_unpacker_table[packer.name]
                return f"{fn.name('C', table)}({inner})"
            return inner
        if isinstance(packer, VPPUnionType):
            # Every arm reads the same bytes: read them once, decode each arm from them.
            raw = fn.leaf(f"{packer.size}s")
            arms = [self.fixed_function(p, ntc)[0] for p in packer.packers.values()]
            make = fn.name("T", packer.tuple._make)
            return f"{make}((" + "".join(f"{arm}({raw}), " for arm in arms) + "))"
        if isinstance(packer, VPPType):
            convert = not ntc and packer.name in vpp_format.conversion_unpacker_table
            fields: list[str] = []
            for field_packer in packer.packers:
                fields.append(self.value(fn, field_packer, ntc or convert, fields))
            made = f"{fn.name('T', packer.tuple._make)}((" + \
                "".join(f"{f}, " for f in fields) + "))"
            if convert:
                table = vpp_format.conversion_unpacker_table[packer.name]
                return f"{fn.name('C', table)}({made})"
            return made
        raise Unsupported(type(packer).__name__)


def compile_decoder(message: Any) -> Decoder | None:
    """A fast decoder for one message definition, or None to keep vpp-papi's."""
    try:
        return _Compiler().function(message, ntc=False, returns_size=False)
    except (Unsupported, AttributeError, KeyError, struct.error):
        return None

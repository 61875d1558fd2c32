"""A pickle reader that executes nothing: torch's `data.pkl` read as data.

A pickle is a program for a stack machine whose GLOBAL and REDUCE opcodes import and
call anything; `pickle.Unpickler` with a `find_class` allow-list still runs the
machine that loads, calls and builds, and allow-lists bolted onto it have been
bypassed (CVE-2025-32434 ran code through torch's `weights_only=True`). This
interpreter knows only the opcodes protocols 2-5 emit for plain data, and it never
imports or calls: a GLOBAL becomes a :class:`Global` *name*, and REDUCE applies one of
the handful of functions a state dict needs, each re-implemented here as a function on
data (`_rebuild_tensor_v2` makes a :class:`TensorRef`, `OrderedDict` a dict, ...).
Any other global, REDUCE or BUILD on anything else, INST/OBJ/NEWOBJ, extensions,
out-of-band buffers or an opcode it does not know end the read with an error naming
it. Steps and memory are bounded, so a hostile pickle cannot make it spin or grow.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeGuard

from ..errors import BadInputError

#: Opcodes executed at most: a state dict costs about 30 per tensor, so this is 130,000 tensors.
MAX_STEPS = 4_000_000
#: Elements held in containers and bytes in strings at most, all values together.
MAX_MEMORY = 512 * 1024 * 1024
_MEMORY_PER_ITEM = 16


@dataclass(frozen=True)
class Global:
    """A global the pickle names (never imported)."""

    module: str
    name: str

    def __str__(self) -> str:
        return f"{self.module}.{self.name}"


@dataclass(frozen=True)
class StorageRef:
    """A persistent id `('storage', type, key, location, numel)`: storage `key` of the zip."""

    dtype: str  # torch's name: "float32", "bfloat16", ... ("uint8" for an untyped storage)
    key: str
    numel: int


@dataclass(frozen=True)
class TensorRef:
    """What `_rebuild_tensor_v2/v3` would build: a view of a storage, in elements."""

    storage: StorageRef
    dtype: str  # torch's name
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]


#: Legacy typed-storage classes and the dtype whose elements they hold.
STORAGE_TYPES = {
    "DoubleStorage": "float64", "FloatStorage": "float32", "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16", "LongStorage": "int64", "IntStorage": "int32", "ShortStorage": "int16",
    "CharStorage": "int8", "ByteStorage": "uint8", "BoolStorage": "bool", "ComplexFloatStorage": "complex64",
    "ComplexDoubleStorage": "complex128",
}
#: dtype globals (`torch.float8_e4m3fn`) that `_rebuild_tensor_v3` names.
TORCH_DTYPES = frozenset({
    "float64", "float32", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool",
    "complex64", "complex128", "uint16", "uint32", "uint64", "float8_e4m3fn", "float8_e5m2",
    "float8_e4m3fnuz", "float8_e5m2fnuz", "float8_e8m0fnu",
})


class _Mark:
    """The MARK sentinel on the stack."""


_MARK = _Mark()


class _OrderedDict(dict[object, object]):
    """A dict made by `collections.OrderedDict()`: BUILD may give it torch's `_metadata`."""


class PickleRefused(BadInputError):
    """The pickle does something a state dict never does; nothing of it was run."""


def load(data: bytes, where: str, *, max_steps: int = MAX_STEPS, max_memory: int = MAX_MEMORY) -> object:
    """The value `data` pickles, built from plain data and the refs above only."""
    return _Machine(data, where, max_steps, max_memory).run()


class _Machine:
    def __init__(self, data: bytes, where: str, max_steps: int, max_memory: int) -> None:
        self.data = data
        self.where = where
        self.position = 0
        self.stack: list[object] = []
        self.memo: dict[int, object] = {}
        self.max_steps = max_steps
        self.memory = 0
        self.max_memory = max_memory

    # ------------------------------------------------------------------ errors and bounds

    def refuse(self, what: str) -> PickleRefused:
        return PickleRefused(f"{self.where}: {what}; refused, nothing was run (shardkit never executes a pickle)")

    def charge(self, amount: int) -> None:
        self.memory += amount
        if self.memory > self.max_memory:
            raise self.refuse(f"the pickle builds more than {self.max_memory:,} bytes of values")

    # ------------------------------------------------------------------ reading the stream

    def take(self, count: int) -> bytes:
        end = self.position + count
        if count < 0 or end > len(self.data):
            raise self.refuse("the pickle ends inside an opcode (truncated)")
        chunk = self.data[self.position : end]
        self.position = end
        return chunk

    def unpack(self, fmt: str) -> int:
        size = struct.calcsize(fmt)
        value: int = struct.unpack(fmt, self.take(size))[0]
        return value

    def line(self) -> str:
        end = self.data.find(b"\n", self.position, self.position + 1024)
        if end < 0:
            raise self.refuse("a GLOBAL name runs past 1024 bytes or the end of the pickle")
        text = self.data[self.position : end]
        self.position = end + 1
        try:
            return text.decode("ascii")
        except UnicodeDecodeError:
            raise self.refuse(f"a GLOBAL name {text!r} is not ASCII") from None

    def pop(self) -> object:
        if not self.stack:
            raise self.refuse("the pickle pops an empty stack")
        value = self.stack.pop()
        if value is _MARK:
            raise self.refuse("the pickle uses a MARK as a value")
        return value

    def pop_mark(self) -> list[object]:
        for index in range(len(self.stack) - 1, -1, -1):
            if self.stack[index] is _MARK:
                items = self.stack[index + 1 :]
                del self.stack[index:]
                return items
        raise self.refuse("the pickle has no MARK where one is needed")

    def push(self, value: object, size: int = 1) -> None:
        self.charge(size * _MEMORY_PER_ITEM)
        self.stack.append(value)

    # ------------------------------------------------------------------ the machine

    def run(self) -> object:
        data, handlers = self.data, _HANDLERS
        for _ in range(self.max_steps):
            at = self.position
            if at >= len(data):
                raise self.refuse("the pickle ends before its STOP opcode (truncated)")
            code = data[at]
            self.position = at + 1
            handler = handlers.get(code)
            if handler is None:
                name = _NAMES.get(code, "unknown")
                raise self.refuse(f"pickle opcode {name} ({code:#04x}) at byte {at}, which no torch state dict uses")
            if handler(self):
                return self.pop()
        raise self.refuse(f"the pickle runs more than {self.max_steps:,} opcodes")

    def get_memo(self, key: int) -> None:
        if key not in self.memo:
            raise self.refuse(f"the pickle reads memo entry {key}, which it never stored")
        self.push(self.memo[key])

    def put_memo(self, key: int) -> None:
        if not self.stack or self.stack[-1] is _MARK:
            raise self.refuse("the pickle memoizes nothing")
        self.charge(_MEMORY_PER_ITEM)
        self.memo[key] = self.stack[-1]

    def push_global(self, module: str, name: str) -> None:
        target = Global(module, name)
        if not _allowed(target):
            raise self.refuse(f"the pickle names the global {target}, which a state dict never needs")
        self.push(target)

    def reduce(self) -> None:
        args = self.pop()
        target = self.pop()
        if not isinstance(target, Global):
            raise self.refuse(f"the pickle calls a {type(target).__name__} value (REDUCE)")
        if not isinstance(args, tuple):
            raise self.refuse(f"the pickle calls {target} with arguments that are not a tuple")
        builder = _BUILDERS.get(str(target))
        if builder is None:
            raise self.refuse(f"the pickle calls {target} (REDUCE), which only names data")
        self.push(builder(self, target, args))

    def build(self) -> None:
        state = self.pop()
        target = self.pop()
        if not isinstance(target, _OrderedDict) or not isinstance(state, dict):
            raise self.refuse(f"the pickle sets the state of a {type(target).__name__} value (BUILD)")
        self.push(target)  # torch's `_metadata` (module versions) is not needed to read tensors

    def persistent(self) -> None:
        pid = self.pop()
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise self.refuse(f"the pickle has a persistent id that is not a torch storage: {_short(pid)}")
        _, kind, key, _location, numel = pid
        if not isinstance(kind, Global) or not isinstance(key, str) or not _is_count(numel):
            raise self.refuse(f"the pickle has a malformed storage id {_short(pid)}")
        if kind.module == "torch" and kind.name in STORAGE_TYPES:
            dtype = STORAGE_TYPES[kind.name]
        elif str(kind) == "torch.storage.UntypedStorage" or str(kind) == "torch.UntypedStorage":
            dtype = "uint8"
        else:
            raise self.refuse(f"the pickle's storage type {kind} is not a storage")
        self.push(StorageRef(dtype, key, numel))


def _allowed(target: Global) -> bool:
    text = str(target)
    if text in _BUILDERS or text in ("torch.storage.UntypedStorage", "torch.UntypedStorage"):
        return True
    return target.module == "torch" and (target.name in STORAGE_TYPES or target.name in TORCH_DTYPES)


def _is_count(value: object) -> TypeGuard[int]:
    return type(value) is int and 0 <= value < 2**63


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


# ---------------------------------------------------------------------- the allowed calls


def _ordered_dict(machine: _Machine, target: Global, args: tuple[object, ...]) -> object:
    if args:
        raise machine.refuse(f"the pickle calls {target} with arguments")
    return _OrderedDict()


def _rebuild_tensor(machine: _Machine, target: Global, args: tuple[object, ...]) -> object:
    v3 = target.name == "_rebuild_tensor_v3"
    if len(args) not in ((7, 8) if v3 else (6, 7)):
        raise machine.refuse(f"the pickle calls {target} with {len(args)} arguments")
    storage, offset, shape, stride = args[:4]
    dtype = args[6] if v3 else getattr(storage, "dtype", None)
    if v3:
        if not (isinstance(dtype, Global) and dtype.module == "torch" and dtype.name in TORCH_DTYPES):
            raise machine.refuse(f"the pickle calls {target} with dtype {_short(dtype)}")
        dtype = dtype.name
    if not isinstance(storage, StorageRef) or not isinstance(dtype, str):
        raise machine.refuse(f"the pickle calls {target} on {_short(storage)}, not a storage")
    if not _is_count(offset) or not _is_dims(shape) or not _is_dims(stride) or len(shape) != len(stride):
        raise machine.refuse(f"the pickle calls {target} with a malformed offset, shape or stride")
    return TensorRef(storage, dtype, offset, shape, stride)


def _rebuild_parameter(machine: _Machine, target: Global, args: tuple[object, ...]) -> object:
    if len(args) != 3 or not isinstance(args[0], TensorRef):
        raise machine.refuse(f"the pickle calls {target} on something that is not a tensor")
    return args[0]


def _size(machine: _Machine, target: Global, args: tuple[object, ...]) -> object:
    if len(args) != 1 or not _is_dims(args[0]):
        raise machine.refuse(f"the pickle calls {target} on something that is not a shape")
    return args[0]


def _encode(machine: _Machine, target: Global, args: tuple[object, ...]) -> object:
    if len(args) != 2 or not isinstance(args[0], str) or args[1] not in ("latin1", "latin-1"):
        raise machine.refuse(f"the pickle calls {target} other than as protocol 2 spells bytes")
    return args[0].encode("latin-1")


def _is_dims(value: object) -> TypeGuard[tuple[int, ...]]:
    return isinstance(value, tuple) and len(value) <= 64 and all(_is_count(v) for v in value)


_BUILDERS: dict[str, Callable[[_Machine, Global, tuple[object, ...]], object]] = {
    "collections.OrderedDict": _ordered_dict,
    "torch._utils._rebuild_tensor_v2": _rebuild_tensor,
    "torch._utils._rebuild_tensor_v3": _rebuild_tensor,
    "torch._utils._rebuild_parameter": _rebuild_parameter,
    "torch.Size": _size,
    "_codecs.encode": _encode,
}


# ---------------------------------------------------------------------- opcodes


def _string(machine: _Machine, length: int) -> None:
    raw = machine.take(length)
    try:
        text = raw.decode("utf-8", "surrogatepass")
    except UnicodeDecodeError:
        raise machine.refuse("the pickle has a string that is not UTF-8") from None
    machine.push(text, 1 + length // _MEMORY_PER_ITEM)


def _bytes(machine: _Machine, length: int) -> None:
    machine.push(machine.take(length), 1 + length // _MEMORY_PER_ITEM)


def _long(machine: _Machine, length: int) -> None:
    if length > 64:
        raise machine.refuse(f"the pickle has a {length}-byte integer")
    machine.push(int.from_bytes(machine.take(length), "little", signed=True))


def _tuple(machine: _Machine, count: int) -> None:
    if len(machine.stack) < count or any(v is _MARK for v in machine.stack[len(machine.stack) - count :]):
        raise machine.refuse("the pickle builds a tuple from a short stack")
    items = tuple(machine.stack[len(machine.stack) - count :])
    del machine.stack[len(machine.stack) - count :]
    machine.push(items, count)


def _set_items(machine: _Machine, items: list[object]) -> None:
    target = machine.pop()
    if not isinstance(target, dict) or len(items) % 2:
        raise machine.refuse("the pickle sets items on something that is not a dict")
    for key, value in zip(items[::2], items[1::2]):
        if not isinstance(key, (str, int)):
            raise machine.refuse(f"the pickle uses a {type(key).__name__} as a dict key")
        target[key] = value
    machine.push(target, len(items))


def _append(machine: _Machine, items: list[object]) -> None:
    target = machine.pop()
    if not isinstance(target, list):
        raise machine.refuse("the pickle appends to something that is not a list")
    target.extend(items)
    machine.push(target, len(items))


def _frame(machine: _Machine) -> None:
    machine.take(8)  # a length hint; the data is read as one stream anyway


def _proto(machine: _Machine) -> None:
    version = machine.take(1)[0]
    if not 2 <= version <= 5:
        raise machine.refuse(f"pickle protocol {version} (torch writes 2)")


def _pop(machine: _Machine) -> None:
    if machine.stack and machine.stack[-1] is _MARK:
        machine.stack.pop()
    else:
        machine.pop()


def _dup(machine: _Machine) -> None:
    value = machine.pop()
    machine.push(value)
    machine.push(value)


def _global(machine: _Machine) -> None:
    module = machine.line()
    machine.push_global(module, machine.line())


def _stack_global(machine: _Machine) -> None:
    name, module = machine.pop(), machine.pop()
    if not isinstance(module, str) or not isinstance(name, str):
        raise machine.refuse("the pickle names a global with values that are not strings (STACK_GLOBAL)")
    machine.push_global(module, name)


def _memoize(machine: _Machine) -> None:
    machine.put_memo(len(machine.memo))


def _dict(machine: _Machine) -> None:
    items = machine.pop_mark()
    machine.push({}, 0)
    _set_items(machine, items)


def _list(machine: _Machine) -> None:
    items = machine.pop_mark()
    machine.push([], 0)
    _append(machine, items)


def _set_item(machine: _Machine) -> None:
    value, key = machine.pop(), machine.pop()
    _set_items(machine, [key, value])


def _append_one(machine: _Machine) -> None:
    _append(machine, [machine.pop()])


def _pop_mark(machine: _Machine) -> None:
    machine.pop_mark()


def _mark_tuple(machine: _Machine) -> None:
    items = machine.pop_mark()
    machine.push(tuple(items), len(items))


def _stop(machine: _Machine) -> bool:
    return True


_Op = Callable[[_Machine], "bool | None"]
_OPS: dict[bytes, tuple[str, _Op]] = {
    b"\x80": ("PROTO", _proto),
    b"\x95": ("FRAME", _frame),
    b".": ("STOP", _stop),
    b"(": ("MARK", lambda m: m.stack.append(_MARK)),
    b"0": ("POP", _pop),
    b"1": ("POP_MARK", _pop_mark),
    b"2": ("DUP", _dup),
    b"N": ("NONE", lambda m: m.push(None)),
    b"\x88": ("NEWTRUE", lambda m: m.push(True)),
    b"\x89": ("NEWFALSE", lambda m: m.push(False)),
    b"J": ("BININT", lambda m: m.push(m.unpack("<i"))),
    b"K": ("BININT1", lambda m: m.push(m.unpack("<B"))),
    b"M": ("BININT2", lambda m: m.push(m.unpack("<H"))),
    b"\x8a": ("LONG1", lambda m: _long(m, m.unpack("<B"))),
    b"\x8b": ("LONG4", lambda m: _long(m, m.unpack("<i"))),
    b"G": ("BINFLOAT", lambda m: m.push(struct.unpack(">d", m.take(8))[0])),
    b"\x8c": ("SHORT_BINUNICODE", lambda m: _string(m, m.unpack("<B"))),
    b"X": ("BINUNICODE", lambda m: _string(m, m.unpack("<I"))),
    b"\x8d": ("BINUNICODE8", lambda m: _string(m, m.unpack("<Q"))),
    b"C": ("SHORT_BINBYTES", lambda m: _bytes(m, m.unpack("<B"))),
    b"B": ("BINBYTES", lambda m: _bytes(m, m.unpack("<I"))),
    b"\x8e": ("BINBYTES8", lambda m: _bytes(m, m.unpack("<Q"))),
    b")": ("EMPTY_TUPLE", lambda m: m.push(())),
    b"t": ("TUPLE", _mark_tuple),
    b"\x85": ("TUPLE1", lambda m: _tuple(m, 1)),
    b"\x86": ("TUPLE2", lambda m: _tuple(m, 2)),
    b"\x87": ("TUPLE3", lambda m: _tuple(m, 3)),
    b"]": ("EMPTY_LIST", lambda m: m.push([])),
    b"l": ("LIST", _list),
    b"a": ("APPEND", _append_one),
    b"e": ("APPENDS", lambda m: _append(m, m.pop_mark())),
    b"}": ("EMPTY_DICT", lambda m: m.push({})),
    b"d": ("DICT", _dict),
    b"s": ("SETITEM", _set_item),
    b"u": ("SETITEMS", lambda m: _set_items(m, m.pop_mark())),
    b"q": ("BINPUT", lambda m: m.put_memo(m.unpack("<B"))),
    b"r": ("LONG_BINPUT", lambda m: m.put_memo(m.unpack("<I"))),
    b"\x94": ("MEMOIZE", _memoize),
    b"h": ("BINGET", lambda m: m.get_memo(m.unpack("<B"))),
    b"j": ("LONG_BINGET", lambda m: m.get_memo(m.unpack("<I"))),
    b"c": ("GLOBAL", _global),
    b"\x93": ("STACK_GLOBAL", _stack_global),
    b"R": ("REDUCE", lambda m: m.reduce()),
    b"b": ("BUILD", lambda m: m.build()),
    b"Q": ("BINPERSID", lambda m: m.persistent()),
}
_HANDLERS: dict[int, _Op] = {code[0]: handler for code, (_, handler) in _OPS.items()}
#: Names of the opcodes refused, for the message.
_NAMES: dict[int, str] = {
    **{code[0]: name for code, (name, _) in _OPS.items()},
    ord("i"): "INST", ord("o"): "OBJ", 0x81: "NEWOBJ", 0x92: "NEWOBJ_EX", 0x82: "EXT1", 0x83: "EXT2",
    0x84: "EXT4", ord("P"): "PERSID", ord("I"): "INT", ord("L"): "LONG", ord("S"): "STRING",
    ord("V"): "UNICODE", ord("F"): "FLOAT", ord("p"): "PUT", ord("g"): "GET", 0x8F: "EMPTY_SET",
    0x90: "ADDITEMS", 0x91: "FROZENSET", 0x96: "BYTEARRAY8", 0x97: "NEXT_BUFFER", 0x98: "READONLY_BUFFER",
    ord("T"): "BINSTRING", ord("U"): "SHORT_BINSTRING",
}

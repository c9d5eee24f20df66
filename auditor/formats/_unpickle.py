"""An allowlist unpickler for PyTorch checkpoints: it rebuilds records, never objects, within a budget.

``pickle`` runs whatever callable a file names, so a checkpoint is unpickled
here with :class:`SafeUnpickler`, whose ``find_class`` answers only with
auditor's own inert constructors: tensor rebuilds give a :class:`TensorRecord`
(storage key, dtype, offset, size, stride: no data is read), storage types
give a :class:`StorageType`, TorchScript classes (``__torch__.*``) give a
:class:`ScriptRecord` subclass that stores its BUILD state, and a handful of
plain containers are allowed. Any other global is refused with
:class:`~auditor.errors.UnsafeInputError` before it is imported.

Before unpickling, :func:`scan` walks the opcodes without running them and
bounds the work the unpickler will do (see :data:`MAX_OPCODES`,
:data:`MAX_MEMORY`, :data:`MAX_DEPTH`): it counts opcodes, estimates the
memory every opcode makes the unpickler allocate (objects, container slots,
memo entries, strings by their length), models the stack well enough to
know how many items a MARK-delimited opcode consumes and how deeply tuples
nest (hashing a tuple nested a million levels deep crashes the interpreter),
and refuses the extension-registry opcodes and memo indices that would make
the C unpickler allocate a table far larger than the pickle. Work that
depends on values (a ``set(...)`` built from a list, a tensor's size tuple)
is charged to the same budget while unpickling.
"""

from __future__ import annotations

import functools
import io
import itertools
import pickle
import pickletools
import re
from collections import OrderedDict as _OrderedDict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from auditor.errors import AuditorError, InputError, UnsafeInputError

__all__ = [
    "MAX_DEPTH",
    "MAX_MEMORY",
    "MAX_OPCODES",
    "MAX_SCRIPT_CLASSES",
    "STORAGE_ITEMSIZE",
    "STORAGE_TYPES",
    "Budget",
    "Malformed",
    "Scan",
    "SafeUnpickler",
    "ScriptRecord",
    "StorageRef",
    "StorageType",
    "TensorRecord",
    "Truncated",
    "scan",
    "short_error",
    "show",
    "survey",
    "unpickle",
]

#: Deepest container nesting accepted in an unpickled checkpoint (tuples are checked before unpickling).
MAX_DEPTH = 1000
#: Most opcodes one pickle may hold. A checkpoint's pickle spends about 30 opcodes per tensor,
#: so this admits some 330,000 tensors; the scan takes 0.1 to 0.5 us per opcode.
MAX_OPCODES = 10_000_000
#: Most memory, in bytes, one pickle may make the unpickler allocate (estimated before unpickling,
#: charged while unpickling). A state dict costs about 1.8 KiB per tensor by this estimate (some
#: 220,000 tensors fit); a hostile 20 MB pickle then peaks under 300 MB (benchmarks/bench_hostile_pickle.py).
MAX_MEMORY = 384 << 20
#: Most distinct TorchScript classes one pickle may name (each becomes a small type).
MAX_SCRIPT_CLASSES = 20_000
#: Most dimensions of one tensor.
MAX_DIMS = 64
#: Largest size, stride or offset accepted (int64, as torch stores them).
MAX_INDEX = (1 << 63) - 1

#: torch storage class name -> (auditor dtype name or ``None`` for one auditor does not read, element size).
STORAGE_TYPES: dict[str, tuple[str | None, int]] = {
    "DoubleStorage": ("float64", 8),
    "FloatStorage": ("float32", 4),
    "HalfStorage": ("float16", 2),
    "BFloat16Storage": ("bfloat16", 2),
    "LongStorage": ("int64", 8),
    "IntStorage": ("int32", 4),
    "ShortStorage": ("int16", 2),
    "CharStorage": ("int8", 1),
    "ByteStorage": ("uint8", 1),
    "BoolStorage": ("bool", 1),
    "UntypedStorage": ("uint8", 1),
    "ComplexFloatStorage": (None, 8),
    "ComplexDoubleStorage": (None, 16),
    "QInt8Storage": (None, 1),
    "QUInt8Storage": (None, 1),
    "QInt32Storage": (None, 4),
    "QUInt4x2Storage": (None, 1),
    "QUInt2x4Storage": (None, 1),
}
#: Element size of each storage type (legacy files lay storages out by it).
STORAGE_ITEMSIZE = {name: size for name, (_, size) in STORAGE_TYPES.items()}
#: torch dtype objects a checkpoint may hold as plain values (``torch.float16``).
_TORCH_DTYPE_NAMES = frozenset(
    "float64 double float32 float float16 half bfloat16 int64 long int32 int int16 short int8 uint8 bool "
    "complex64 complex128 cfloat cdouble".split()
)
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_MANGLE = re.compile(r"\.___torch_mangle_\d+")


class Malformed(ValueError):
    """A value in the pickle has the wrong type or range for what it claims to be."""


class Truncated(Exception):
    """The pickle runs past the end of the bytes scanned (a legacy reader then reads more)."""


def show(value: Any, limit: int = 80) -> str:
    """A short, safe description of a value from a hostile pickle, for messages.

    Never recurses deeply, never converts a huge integer to text (which raises
    past 4,300 digits) and never calls code the pickle could have chosen.
    """
    if isinstance(value, str):
        text = repr(value[:limit])
        return text if len(value) <= limit else text[:-1] + "...'"
    if isinstance(value, bool) or value is None:
        return repr(value)
    if isinstance(value, int):
        return repr(value) if value.bit_length() <= 128 else f"<an integer of {value.bit_length()} bits>"
    if isinstance(value, float):
        return repr(value)
    if (
        isinstance(value, (tuple, list))
        and len(value) <= 8
        and all(isinstance(v, (str, int, float, type(None))) for v in value)
    ):
        inner = ", ".join(show(v, 24) for v in value)
        text = f"({inner}{',' if len(value) == 1 else ''})" if isinstance(value, tuple) else f"[{inner}]"
        return text if len(text) <= 2 * limit else text[: 2 * limit] + "..."
    if isinstance(value, ScriptRecord):
        return f"a {value.torch_class()}"
    if isinstance(value, (tuple, list, dict, set, frozenset, bytes, bytearray)):
        return f"a {type(value).__name__} of {len(value)} items"
    return f"a {type(value).__name__}"


class Budget:
    """Bytes the unpickler may still allocate for one pickle; :meth:`charge` refuses past the limit."""

    __slots__ = ("left", "path", "what")

    def __init__(self, left: int, *, path: Path, what: str) -> None:
        self.left, self.path, self.what = left, path, what

    def charge(self, nbytes: int) -> None:
        """Spend ``nbytes``; InputError once the pickle's estimated memory passes :data:`MAX_MEMORY`."""
        self.left -= nbytes
        if self.left < 0:
            raise _over_memory(self.path, self.what)


def _over_memory(path: Path, what: str) -> InputError:
    return InputError(
        path, f"{what} would take more than {MAX_MEMORY >> 20} MiB of memory to unpickle (refused, estimated)"
    )


class _Sealed:
    """Refuses BUILD: a pickle must not change a record after it was checked, nor
    set attributes on auditor's own functions (that would outlive the load)."""

    __slots__ = ()

    def __setstate__(self, state: Any) -> None:
        raise Malformed(f"a {type(self).__name__} cannot take state from the pickle")


@dataclass(frozen=True)
class StorageType(_Sealed):
    """What ``torch.FloatStorage`` (and friends) unpickle to: a name and a dtype."""

    name: str
    dtype: str | None


@dataclass(frozen=True)
class TorchDtype(_Sealed):
    """What ``torch.float16`` unpickles to, when a checkpoint stores a dtype as a value."""

    name: str


@dataclass(frozen=True)
class StorageRef(_Sealed):
    """A storage named by a persistent id: the key of its bytes, its dtype and size.

    ``view_offset`` is the element offset of a legacy storage view into the
    root storage ``key`` (0 otherwise); ``numel`` is the view's element count.
    """

    key: str
    type: StorageType
    numel: int
    location: str
    view_offset: int = 0


@dataclass(frozen=True)
class TensorRecord(_Sealed):
    """A tensor as the pickle describes it; the bytes stay in the file."""

    storage: StorageRef
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]

    @functools.cached_property
    def extent(self) -> int:
        """Elements of the storage the view reaches (``offset`` + the farthest element + 1), 0 if empty."""
        if 0 in self.size:
            return 0
        return self.offset + sum((n - 1) * st for n, st in zip(self.size, self.stride, strict=True)) + 1


class ScriptRecord:
    """An inert stand-in for an object of a TorchScript class (``__torch__.*``).

    Subclasses are created per class name so that the name survives; BUILD
    stores the state in ``state`` instead of running any ``__setstate__``.
    """

    qualified_name = ""
    # Class-level defaults: NEWOBJ makes instances with __new__ alone, skipping __init__.
    args: tuple[Any, ...] = ()
    state: Any = None
    _budget: Budget | None = None

    def __init__(self, *args: Any) -> None:
        if self._budget is not None:
            self._budget.charge(_TUPLE + 8 * len(args))
        self.args = args

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __repr__(self) -> str:
        return f"<ScriptRecord {self.qualified_name}>"

    @classmethod
    def torch_class(cls) -> str:
        """The class name without TorchScript's ``___torch_mangle_N`` parts."""
        return _MANGLE.sub("", cls.qualified_name)


# --------------------------------------------------------------------------- the allowlist


def _int(value: Any, what: str) -> int:
    if type(value) is not int or not 0 <= value <= MAX_INDEX:
        raise Malformed(f"{what} is {show(value)}, not a non-negative 64-bit integer")
    return value


def _ints(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, (tuple, list)) or len(value) > MAX_DIMS:
        raise Malformed(f"{what} is {show(value)}, not a tuple of at most {MAX_DIMS} integers")
    ints = tuple(value)
    if ints and not (set(map(type, ints)) == {int} and min(ints) >= 0 and max(ints) <= MAX_INDEX):
        for v in ints:  # name the culprit
            _int(v, what)
    return ints


_TUPLE = 64  # bytes of a small tuple, with room for the survey's bookkeeping


def _rebuild_tensor(budget: Budget, storage: Any, storage_offset: Any, size: Any, stride: Any, *_: Any) -> TensorRecord:
    # Stands in for torch._utils._rebuild_tensor and _rebuild_tensor_v2; the
    # extra arguments (requires_grad, backward hooks, metadata) are ignored.
    if not isinstance(storage, StorageRef):
        raise Malformed(f"a tensor's storage is {show(storage)}, not a storage")
    size_t, stride_t = _ints(size, "a tensor's size"), _ints(stride, "a tensor's stride")
    if len(size_t) != len(stride_t):
        raise Malformed(f"a tensor's size {size_t} and stride {stride_t} differ in length")
    # The record (about 100 bytes and its extent, once computed); a size or stride given as a list is copied.
    budget.charge(
        160 + sum(_TUPLE + 8 * len(new) for new, old in ((size_t, size), (stride_t, stride)) if new is not old)
    )
    return TensorRecord(storage, _int(storage_offset, "a tensor's storage offset"), size_t, stride_t)


def _rebuild_parameter(budget: Budget, data: Any, *_: Any) -> Any:
    # A Parameter is its data for auditor's purposes; hooks and state are dropped.
    if not isinstance(data, TensorRecord):
        raise Malformed(f"a parameter holds {show(data)}, not a tensor")
    return data


def _passthrough(budget: Budget, value: Any, *_: Any) -> Any:
    # torch.jit._pickle.build_intlist, build_tensorlist, restore_type_tag...: the value is the value.
    return value


def _torch_size(budget: Budget, *args: Any) -> tuple[int, ...]:
    given = args[0] if args else ()
    size = _ints(given, "a torch.Size")
    if size is not given:  # a list, copied
        budget.charge(_TUPLE + 8 * len(size))
    return size


def _codecs_encode(budget: Budget, text: Any, encoding: Any = "utf-8", *_: Any) -> bytes:
    # Protocol-2 pickles store bytes as _codecs.encode(str, "latin1"); no other codec is run.
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise Malformed("_codecs.encode is only read for latin1 text")
    budget.charge(48 + len(text))
    try:
        return text.encode("latin1")
    except UnicodeEncodeError:
        raise Malformed("_codecs.encode is given text that is not latin1") from None


def _items(value: Any, what: str) -> Any:
    if not isinstance(value, (list, tuple, set, frozenset, dict)):
        raise Malformed(f"{what} is built from {show(value)}, not from a list")
    return value


class _PlainOrderedDict(_OrderedDict[Any, Any]):
    """An OrderedDict whose BUILD state (``_metadata``, version numbers) is dropped instead of copied."""

    def __setstate__(self, state: Any) -> None:
        pass


_PlainOrderedDict.__name__ = _PlainOrderedDict.__qualname__ = "OrderedDict"


def _ordered_dict(budget: Budget, *args: Any) -> Any:
    items = _items(args[0], "an OrderedDict") if args else ()
    budget.charge(128 + 128 * len(items))
    if isinstance(items, dict):
        return _PlainOrderedDict(items)
    result = _PlainOrderedDict()
    for pair in items:
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
            raise Malformed(f"an OrderedDict is built from {show(pair)}, not a key-value pair")
        try:
            result[pair[0]] = pair[1]
        except TypeError:
            raise Malformed(f"an OrderedDict key is {show(pair[0])}, which cannot be a key") from None
    return result


def _set(budget: Budget, *args: Any) -> Any:
    items = _items(args[0], "a set") if args else ()
    budget.charge(256 + 64 * len(items))
    try:
        return set(items)
    except TypeError:
        raise Malformed("a set holds an item that cannot be in a set") from None


def _frozenset(budget: Budget, *args: Any) -> Any:
    items = _items(args[0], "a frozenset") if args else ()
    budget.charge(256 + 64 * len(items))
    try:
        return frozenset(items)
    except TypeError:
        raise Malformed("a frozenset holds an item that cannot be in a set") from None


class _SafeCall(_Sealed):
    """One of auditor's constructors as the pickle sees it: callable, sealed against BUILD,
    checked for its number of arguments and charging what it builds to the pickle's budget."""

    __slots__ = ("_fn", "_min", "_max", "_name", "_budget")

    def __init__(self, name: str, fn: Callable[..., Any], arity: tuple[int, int], budget: Budget) -> None:
        self._name, self._fn, (self._min, self._max), self._budget = name, fn, arity, budget

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if kwargs or not self._min <= len(args) <= self._max:
            raise Malformed(f"{self._name} is called with {len(args) + len(kwargs)} arguments")
        return self._fn(self._budget, *args)


_ANY = 1 << 30
# (module, name) -> (constructor, (fewest, most) positional arguments)
_SAFE: dict[tuple[str, str], tuple[Callable[..., Any], tuple[int, int]]] = {
    ("torch._utils", "_rebuild_tensor"): (_rebuild_tensor, (4, 4)),
    ("torch._utils", "_rebuild_tensor_v2"): (_rebuild_tensor, (4, 7)),
    ("torch._utils", "_rebuild_parameter"): (_rebuild_parameter, (1, 3)),
    ("torch._utils", "_rebuild_parameter_with_state"): (_rebuild_parameter, (1, 4)),
    ("torch", "Size"): (_torch_size, (0, 1)),
    ("_codecs", "encode"): (_codecs_encode, (1, 3)),
    ("collections", "OrderedDict"): (_ordered_dict, (0, 1)),
    ("builtins", "set"): (_set, (0, 1)),
    ("builtins", "frozenset"): (_frozenset, (0, 1)),
    ("__builtin__", "set"): (_set, (0, 1)),
    ("__builtin__", "frozenset"): (_frozenset, (0, 1)),
    **{
        ("torch.jit._pickle", f): (_passthrough, (1, _ANY))
        for f in (
            "build_intlist",
            "build_tensorlist",
            "build_doublelist",
            "build_boollist",
            "build_tensor_from_id",
            "restore_type_tag",
        )
    },
}


def _refusal(module: str, name: str) -> str:
    hint = ""
    if module.startswith("torch.nn") or module == "__main__":
        hint = "; a whole pickled model cannot be read safely, save its state_dict() instead"
    return (
        f"refused: the pickle references {module}.{name}, which auditor will not rebuild "
        f"(only tensors, storages and plain containers are read){hint}"
    )


class SafeUnpickler(pickle.Unpickler):
    """An unpickler that rebuilds only tensor records, storages, plain containers and TorchScript records.

    ``persistent_load`` is handed to ``storage``, which maps a persistent id
    to a :class:`StorageRef` (zip and legacy checkpoints name storages differently).
    What the constructors build is charged to ``budget``.
    """

    def __init__(
        self, data: bytes, *, path: Path, storage: Callable[[tuple[Any, ...]], StorageRef], budget: Budget
    ) -> None:
        super().__init__(io.BytesIO(data))
        self._path = path
        self._storage = storage
        self._budget = budget
        self._calls: dict[tuple[str, str], _SafeCall] = {}
        self._script_classes: dict[str, type[ScriptRecord]] = {}

    def find_class(self, module: str, name: str) -> Any:
        """Our own inert constructor for an allowed global; UnsafeInputError for anything else."""
        if not isinstance(module, str) or not isinstance(name, str):
            raise UnsafeInputError(self._path, "refused: the pickle names a global that is not a string")
        key = (module, name)
        if key in _SAFE:
            if key not in self._calls:
                fn, arity = _SAFE[key]
                self._calls[key] = _SafeCall(f"{module}.{name}", fn, arity, self._budget)
            return self._calls[key]
        if module in ("torch", "torch.storage") and name in STORAGE_TYPES:
            return StorageType(name, STORAGE_TYPES[name][0])
        if module == "torch" and name in _TORCH_DTYPE_NAMES:
            return TorchDtype(name)
        if module.partition(".")[0] == "__torch__" and all(_IDENT.match(p) for p in [*module.split("."), name]):
            return self._script_class(f"{module}.{name}")
        raise UnsafeInputError(self._path, _refusal(module[:200], name[:200]))

    def _script_class(self, qualified: str) -> type[ScriptRecord]:
        # Making a named type runs no code from the file; the name is checked above.
        cls = self._script_classes.get(qualified)
        if cls is None:
            if len(self._script_classes) >= MAX_SCRIPT_CLASSES:
                raise InputError(self._path, f"the pickle names more than {MAX_SCRIPT_CLASSES} TorchScript classes")
            attrs = {"qualified_name": qualified, "_budget": self._budget}
            cls = type(qualified.rsplit(".", 1)[-1], (ScriptRecord,), attrs)
            self._script_classes[qualified] = cls
        return cls

    def persistent_load(self, pid: Any) -> Any:
        """A :class:`StorageRef` for a ``('storage', ...)`` persistent id; anything else is malformed."""
        kind = pid[0] if isinstance(pid, tuple) and pid else None
        if not (isinstance(kind, (str, bytes)) and kind in ("storage", b"storage")):
            raise Malformed(f"unknown persistent id {show(pid)}")
        return self._storage(pid)


# --------------------------------------------------------------------------- the scan

# What each opcode costs: the bytes it makes the unpickler allocate (objects by sys.getsizeof on CPython
# 3.11, a stack slot, and the survey's bookkeeping for containers), rounded up. Strings add their length,
# MARK-delimited opcodes a cost per item they consume (_PER_ITEM), the constructors what they build.
_PUSH = 16  # a stack slot, and a list slot if the object is appended somewhere
_COSTS: dict[str, int] = {
    "INT": 48, "BININT": 48, "BININT1": _PUSH, "BININT2": 48, "LONG": 48, "LONG1": 48, "LONG4": 48,
    "STRING": 64, "BINSTRING": 64, "SHORT_BINSTRING": 64, "BINBYTES": 48, "SHORT_BINBYTES": 48,
    "BINBYTES8": 48, "BYTEARRAY8": 80, "NEXT_BUFFER": _PUSH, "READONLY_BUFFER": 0,
    "NONE": _PUSH, "NEWTRUE": _PUSH, "NEWFALSE": _PUSH, "UNICODE": 96, "SHORT_BINUNICODE": 64,
    "BINUNICODE": 64, "BINUNICODE8": 64, "FLOAT": 40, "BINFLOAT": 40,
    "EMPTY_LIST": 72, "APPEND": 72, "APPENDS": 64, "LIST": 136, "EMPTY_TUPLE": _PUSH, "TUPLE": 120,
    "TUPLE1": 128, "TUPLE2": 136, "TUPLE3": 144, "EMPTY_DICT": 80, "DICT": 144, "SETITEM": 192,
    "SETITEMS": 64, "EMPTY_SET": 232, "ADDITEMS": 64, "FROZENSET": 296,
    "POP": 0, "DUP": _PUSH, "MARK": 8, "POP_MARK": 0, "GET": _PUSH, "BINGET": _PUSH, "LONG_BINGET": _PUSH,
    "PUT": 0, "BINPUT": 0, "LONG_BINPUT": 0, "MEMOIZE": 0, "EXT1": 0, "EXT2": 0, "EXT4": 0,
    "GLOBAL": 2560, "STACK_GLOBAL": 2560, "INST": 2560, "OBJ": 256, "NEWOBJ": 256, "NEWOBJ_EX": 256,
    "REDUCE": _PUSH, "BUILD": 192, "PROTO": 0, "STOP": 0, "FRAME": 0, "PERSID": 256, "BINPERSID": 256,
}  # fmt: skip
_PER_ITEM = {"APPENDS": 8, "LIST": 8, "TUPLE": 8, "DICT": 64, "SETITEMS": 64, "ADDITEMS": 64, "FROZENSET": 64}
_MEMO_SLOT = 16  # the C unpickler's memo table: a pointer per index, grown by doubling
_TEXT_FACTOR = 4  # a str holds up to 4 bytes per character of non-ASCII UTF-8

# How the scan treats each opcode. _SIMPLE opcodes pop a fixed number of items and push one object that is
# not a tuple, or nothing; the others need a closer look. The scan tests the kinds in this order, the most
# frequent first.
(_SIMPLE, _PUT, _GET, _STRING, _MARK, _TUPLE_N, _REDUCE, _TO_MARK, _POP, _DUP, _LINE, _PROTO, _STOP, _EXT,
 _UNKNOWN) = range(15)  # fmt: skip
_KINDS: dict[str, int] = {
    **dict.fromkeys(["BININT", "BININT1", "BININT2", "NONE", "NEWTRUE", "NEWFALSE", "BINFLOAT", "EMPTY_LIST",
                     "EMPTY_TUPLE", "EMPTY_DICT", "EMPTY_SET", "NEXT_BUFFER", "READONLY_BUFFER", "FRAME", "APPEND",
                     "SETITEM", "BUILD", "STACK_GLOBAL", "NEWOBJ", "NEWOBJ_EX", "BINPERSID"], _SIMPLE),
    **dict.fromkeys(["BINPUT", "LONG_BINPUT", "MEMOIZE"], _PUT), **dict.fromkeys(["BINGET", "LONG_BINGET"], _GET),
    **dict.fromkeys(["LONG1", "LONG4", "BINSTRING", "SHORT_BINSTRING", "BINBYTES", "SHORT_BINBYTES", "BINBYTES8",
                     "BYTEARRAY8", "SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8"], _STRING),
    "MARK": _MARK, "TUPLE1": _TUPLE_N, "TUPLE2": _TUPLE_N, "TUPLE3": _TUPLE_N, "REDUCE": _REDUCE,
    **dict.fromkeys(["APPENDS", "SETITEMS", "ADDITEMS", "POP_MARK", "LIST", "DICT", "FROZENSET", "OBJ", "TUPLE"],
                    _TO_MARK),
    "POP": _POP, "DUP": _DUP,
    **dict.fromkeys(["INT", "LONG", "FLOAT", "STRING", "UNICODE", "GET", "PUT", "GLOBAL", "INST", "PERSID"], _LINE),
    "PROTO": _PROTO, "STOP": _STOP, "EXT1": _EXT, "EXT2": _EXT, "EXT4": _EXT,
}  # fmt: skip
# Items popped by the _SIMPLE opcodes that pop, and by TUPLE1-3; which _SIMPLE opcodes push nothing.
_POPS = {"APPEND": 1, "SETITEM": 2, "BUILD": 1, "STACK_GLOBAL": 2, "NEWOBJ": 2, "NEWOBJ_EX": 3, "BINPERSID": 1,
         "TUPLE1": 1, "TUPLE2": 2, "TUPLE3": 3}  # fmt: skip
_NO_PUSH = {"READONLY_BUFFER", "FRAME", "APPEND", "SETITEM", "BUILD"}
# Length-prefixed arguments: (bytes of the length, signed, bytes per byte of argument in the object made;
# 0 for text, which takes 1 or up to 4 by its content).
_LENGTHS = {"LONG1": (1, True, 2), "LONG4": (4, True, 2), "BINSTRING": (4, True, 1), "SHORT_BINSTRING": (1, False, 1),
            "BINBYTES": (4, False, 1), "SHORT_BINBYTES": (1, False, 1), "BINBYTES8": (8, False, 1),
            "BYTEARRAY8": (8, False, 1), "SHORT_BINUNICODE": (1, False, 0), "BINUNICODE": (4, False, 0),
            "BINUNICODE8": (8, False, 0)}  # fmt: skip
_BUILDS = {"LIST", "DICT", "FROZENSET", "OBJ"}  # MARK-delimited opcodes that push a result (TUPLE aside)


class _Spec(NamedTuple):
    name: str
    kind: int
    size: int  # 1 + a fixed argument's bytes (1 for an argument of variable length)
    cost: int
    pops: int  # _SIMPLE, _TUPLE_N: items popped; _STRING: bytes of the length; _LINE: lines of argument
    pushes: int  # _SIMPLE: 1 if it pushes; _TO_MARK: 1 if it pushes, 2 for TUPLE; _STRING: 1 if the length is signed
    per_item: int  # _TO_MARK: bytes per item consumed; _STRING: bytes per byte of argument (0: text)


def _specs() -> list[_Spec]:
    table = [_Spec("unknown", _UNKNOWN, 1, 0, 0, 0, 0)] * 256
    for op in pickletools.opcodes:
        name, n = op.name, 0 if op.arg is None else op.arg.n
        kind, pops, pushes, per_item = _KINDS[name], _POPS.get(name, 0), 0, 0
        if kind == _SIMPLE:
            pushes = int(name not in _NO_PUSH)
        elif kind == _TO_MARK:
            pushes, per_item = (2 if name == "TUPLE" else int(name in _BUILDS)), _PER_ITEM.get(name, 0)
        elif kind == _STRING:
            pops, signed, per_item = _LENGTHS[name]
            pushes = int(signed)
        elif kind == _LINE:
            pops = 2 if name in ("GLOBAL", "INST") else 1
        table[ord(op.code.encode("latin1"))] = _Spec(name, kind, 1 + max(n, 0), _COSTS[name], pops, pushes, per_item)
    return table


_SPECS = _specs()
# What the scan's loop reads first for each opcode byte: (kind, bytes of the opcode and a fixed argument,
# cost, items popped, whether it pushes).
_QUICK = [(spec.kind, spec.size, spec.cost, spec.pops, spec.pushes) for spec in _SPECS]


class Scan(NamedTuple):
    """What :func:`scan` found: where the pickle ends, how many opcodes it holds and its estimated memory."""

    end: int
    opcodes: int
    memory: int


def scan(data: bytes, start: int = 0, *, path: Path, what: str) -> Scan:
    """Walk one pickle's opcodes in ``data`` from ``start`` to its STOP without running them.

    Refuses (InputError) a pickle of more than :data:`MAX_OPCODES` opcodes,
    of more than :data:`MAX_MEMORY` estimated bytes, with tuples nested more
    than :data:`MAX_DEPTH` deep, with memo indices beyond the number of
    opcodes read, an unknown protocol or an unknown opcode (naming the byte
    offset); refuses (UnsafeInputError) the EXT opcodes, which resolve
    globals through the process's copyreg registry and which no torch writer
    emits. Raises :class:`Truncated` when the bytes end before the STOP.
    """
    end = len(data)
    pos, count, memory, limit, budget, max_depth = start, 0, 0, MAX_OPCODES, MAX_MEMORY, MAX_DEPTH
    stack: list[int] = []  # per stack item: how deeply it nests tuples (0 for anything else)
    marks: list[int] = []  # the stack's length at each open MARK
    memo: dict[int, int] = {}  # memo index -> tuple depth of what it holds, for tuples only
    memo_top = 0  # one past the largest memo index written
    specs, quick, push, pop = _SPECS, _QUICK, stack.append, stack.pop
    # The kinds as locals: comparing with a local is much cheaper than with a module global.
    simple, put, get, string, mark, tuple_n, reduce, to_mark, pop_, dup = (
        _SIMPLE, _PUT, _GET, _STRING, _MARK, _TUPLE_N, _REDUCE, _TO_MARK, _POP, _DUP,
    )  # fmt: skip
    try:
        while count < limit:
            kind, size, cost, pops, pushes = quick[data[pos]]
            count += 1
            at = pos
            pos += size
            memory += cost
            if kind == simple:
                if pops:
                    del stack[-pops:]
                if pushes:
                    push(0)
            elif kind == put:
                if size == 2:  # BINPUT
                    index = data[at + 1]
                elif size == 5:  # LONG_BINPUT
                    index = int.from_bytes(data[at + 1 : pos], "little")
                else:  # MEMOIZE: the next index (as the pickler writes them, one past the largest)
                    index = memo_top
                if index >= memo_top:
                    if index > count:
                        raise InputError(path, f"{what} is malformed: memo index {index} at opcode {count}")
                    memory += _MEMO_SLOT * (index + 1 - memo_top)
                    memo_top = index + 1
                if stack and stack[-1]:
                    memo[index] = stack[-1]
                elif memo:
                    memo.pop(index, None)
            elif kind == get:
                push(memo.get(data[at + 1] if size == 2 else int.from_bytes(data[at + 1 : pos], "little"), 0))
            elif kind == string:
                if pos + pops > end:
                    raise Truncated
                length = int.from_bytes(data[pos : pos + pops], "little", signed=bool(pushes))
                if length < 0:
                    name = specs[data[at]].name
                    raise InputError(path, f"{what} is malformed: {name} at byte {at} has a negative length")
                pos += pops + length
                if pos > end:
                    raise Truncated
                factor = specs[data[at]].per_item or (1 if _is_ascii(data, pos - length, pos) else _TEXT_FACTOR)
                memory += factor * length
                push(0)
            elif kind == mark:
                marks.append(len(stack))
            elif kind == tuple_n:
                if len(stack) < pops:
                    stack[:] = [0] * pops  # an underflow the unpickler will report; keep counting
                depth = 1 + (stack[-1] if pops == 1 else max(stack[-pops:]))
                if pops > 1:
                    del stack[1 - pops :]
                stack[-1] = depth
                if depth > max_depth:
                    raise InputError(path, f"{what} nests tuples more than {MAX_DEPTH} levels deep (at byte {at})")
            elif kind == reduce:  # a pass-through constructor may return the tuple it is given
                args = pop() if stack else 0
                if stack:
                    stack[-1] = args
                else:
                    push(args)
            elif kind == to_mark:
                spec = specs[data[at]]
                base = marks.pop() if marks else len(stack)
                memory += spec.per_item * (len(stack) - base)
                if spec.pushes == 2:
                    push(_deeper(stack, base, at, path, what))
                else:
                    del stack[base:]
                    if spec.pushes:
                        push(0)
            elif kind == pop_:
                if marks and len(stack) == marks[-1]:  # POP on an empty frame drops its MARK
                    marks.pop()
                elif stack:
                    pop()
            elif kind == dup:
                push(stack[-1] if stack else 0)
            elif kind == _LINE:
                pos, memory, memo_top = _line(
                    data, at, specs[data[at]], memory=memory, memo_top=memo_top, stack=stack, memo=memo, path=path,
                    what=what,
                )  # fmt: skip
            elif kind == _PROTO:
                if data[at + 1] > pickle.HIGHEST_PROTOCOL:
                    raise InputError(path, f"{what} uses unknown pickle protocol {data[at + 1]}")
            elif kind == _STOP:
                if memory > budget:
                    raise _over_memory(path, what)
                return Scan(pos, count, memory)
            elif kind == _EXT:
                name = specs[data[at]].name
                raise UnsafeInputError(
                    path, f"refused: {what} uses the {name} opcode (globals from the extension registry)"
                )
            else:
                raise InputError(path, f"{what} is malformed: unknown opcode 0x{data[at]:02x} at byte {at}")
            if memory > budget:
                raise _over_memory(path, what)
    except IndexError:  # data[pos] past the end, or an argument cut short
        raise Truncated from None
    if pos > end:
        raise Truncated
    raise InputError(path, f"{what} holds more than {MAX_OPCODES} opcodes")


def _line(
    data: bytes,
    at: int,
    spec: _Spec,
    *,
    memory: int,
    memo_top: int,
    stack: list[int],
    memo: dict[int, int],
    path: Path,
    what: str,
) -> tuple[int, int, int]:
    """The protocol-0 opcodes whose arguments are lines of text: where the next opcode starts, the memory
    estimate and the memo's top after it."""
    pos = at + 1
    for _ in range(spec.pops):
        nl = data.find(b"\n", pos)
        if nl < 0:
            raise Truncated
        pos = nl + 1
    text = data[at + 1 : pos - 1]
    if spec.name in ("GET", "PUT"):
        if not (text.isdigit() and len(text) <= 18):
            raise InputError(path, f"{what} is malformed: {spec.name} at byte {at} has the argument {text[:20]!r}")
        index = int(text)
        if spec.name == "GET":
            stack.append(memo.get(index, 0))
            return pos, memory, memo_top
        if index >= memo_top:  # the C unpickler sizes its memo table by the largest index
            memory += _MEMO_SLOT * (index + 1 - memo_top)
            memo_top = index + 1
        if stack and stack[-1]:
            memo[index] = stack[-1]
        return pos, memory, memo_top
    memory += (_TEXT_FACTOR if spec.name == "UNICODE" else 1) * len(text)
    stack.append(0)
    return pos, memory, memo_top


def _is_ascii(data: bytes, start: int, stop: int) -> bool:
    # In slices, so that a huge string is not copied whole.
    return all(data[i : min(i + (1 << 20), stop)].isascii() for i in range(start, stop, 1 << 20))


def _deeper(stack: list[int], base: int, at: int, path: Path, what: str) -> int:
    """Pops the items above ``base`` into a tuple: how deeply the tuple nests tuples."""
    base = max(base, 0)
    depth = 1 + max(stack[base:], default=0)
    del stack[base:]
    if depth > MAX_DEPTH:
        raise InputError(path, f"{what} nests tuples more than {MAX_DEPTH} levels deep (at byte {at})")
    return depth


# --------------------------------------------------------------------------- unpickling


def short_error(exc: BaseException) -> str:
    """``TypeName: first line of the message`` of an exception, for one-line errors."""
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text[:160]}" if text else type(exc).__name__


def _raised_by_the_unpickler(exc: BaseException) -> bool:
    """Whether ``exc`` came from the C unpickler itself (a malformed pickle) rather than from Python
    code it called: auditor's constructors raise Malformed or InputError, so anything else from them is a bug."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and tb.tb_frame.f_code is _load.__code__


def unpickle(
    data: bytes, *, path: Path, what: str, storage: Callable[[tuple[Any, ...]], StorageRef], scanned: Scan | None = None
) -> Any:
    """``data`` unpickled with :class:`SafeUnpickler` after :func:`scan`; every failure is an InputError.

    The pickle must fill ``data`` exactly. Pass ``scanned`` when ``data`` was already scanned.
    """
    if scanned is None:
        try:
            scanned = scan(data, path=path, what=what)
        except Truncated:
            raise InputError(path, f"{what} is truncated: it ends before its STOP opcode") from None
    if scanned.end != len(data):
        raise InputError(path, f"{what} has {len(data) - scanned.end} bytes after its STOP opcode")
    budget = Budget(MAX_MEMORY - scanned.memory, path=path, what=what)
    try:
        return _load(data, path=path, storage=storage, budget=budget)
    except AuditorError:
        raise
    except Malformed as exc:
        raise InputError(path, f"{what} is malformed: {exc}") from None
    except MemoryError:
        raise InputError(path, f"{what} needs more memory than is available to unpickle") from None
    except Exception as exc:
        if _raised_by_the_unpickler(exc):  # the pickle machine stopped on bytes that make no sense
            raise InputError(path, f"{what} is malformed ({short_error(exc)})") from None
        raise


def _load(data: bytes, *, path: Path, storage: Callable[[tuple[Any, ...]], StorageRef], budget: Budget) -> Any:
    # Its own frame, so that an exception raised inside the C unpickler has no frame below this one.
    return SafeUnpickler(data, path=path, storage=storage, budget=budget).load()


_CONTAINERS = (dict, list, tuple, set, frozenset, ScriptRecord)


def _children(obj: Any) -> Iterator[Any]:
    """The containers ``obj`` holds (keys, values, items, a record's state and arguments), one at a time."""
    if isinstance(obj, dict):
        items: Iterable[Any] = itertools.chain.from_iterable(obj.items())
    elif isinstance(obj, ScriptRecord):
        items = (obj.state, *obj.args)
    else:
        items = obj
    return (x for x in items if isinstance(x, _CONTAINERS))


def _empty(obj: Any) -> bool:
    if isinstance(obj, ScriptRecord):
        return obj.state is None and not obj.args
    return not obj


def survey(root: Any, *, path: Path) -> int:
    """Visit every container under ``root`` once, iteratively; InputError past MAX_DEPTH levels.

    Memo sharing lets a small pickle describe a huge tree ("billion laughs")
    and a list hold itself ten million times; each container is remembered
    and stacked once, when first met, so this stays linear in the pickle's
    size and its memory in the number of distinct non-empty containers.
    Returns the number of containers visited.
    """
    if not isinstance(root, _CONTAINERS):
        return 0
    seen = {id(root)}
    stack: list[tuple[Any, int]] = [(root, 0)]
    visited = 0
    while stack:
        obj, depth = stack.pop()
        visited += 1
        for child in _children(obj):
            if depth >= MAX_DEPTH:
                raise InputError(path, f"the pickle nests objects more than {MAX_DEPTH} levels deep")
            if id(child) not in seen and not _empty(child):
                seen.add(id(child))
                stack.append((child, depth + 1))
    return visited

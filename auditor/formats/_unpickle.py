"""An allowlist unpickler for PyTorch checkpoints: it rebuilds records, never objects.

``pickle`` runs whatever callable a file names, so a checkpoint is unpickled
here with :class:`SafeUnpickler`, whose ``find_class`` answers only with
auditor's own inert constructors: tensor rebuilds give a :class:`TensorRecord`
(storage key, dtype, offset, size, stride: no data is read), storage types
give a :class:`StorageType`, TorchScript classes (``__torch__.*``) give a
:class:`ScriptRecord` subclass that stores its BUILD state, and a handful of
plain containers are allowed. Any other global is refused with
:class:`~auditor.errors.UnsafeInputError` before it is imported.

Before unpickling, :func:`prescan` walks the opcodes without running them:
it refuses the extension-registry opcodes and memo indices that would make
the C unpickler allocate a table far larger than the pickle.
"""

from __future__ import annotations

import io
import pickle
import pickletools
import re
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from auditor.errors import AuditorError, InputError, UnsafeInputError

__all__ = [
    "MAX_DEPTH",
    "MAX_NODES",
    "MAX_OPCODES",
    "STORAGE_ITEMSIZE",
    "STORAGE_TYPES",
    "Malformed",
    "SafeUnpickler",
    "ScriptRecord",
    "StorageRef",
    "StorageType",
    "TensorRecord",
    "prescan",
    "short_error",
    "survey",
    "unpickle",
]

#: Deepest container nesting accepted in an unpickled checkpoint.
MAX_DEPTH = 1000
#: Most distinct objects one checkpoint may unpickle to.
MAX_NODES = 10_000_000
#: Most opcodes one pickle may hold: each can make an object, so this bounds memory before unpickling.
MAX_OPCODES = 20_000_000
#: Most distinct TorchScript classes one pickle may name (each becomes a small type).
MAX_SCRIPT_CLASSES = 100_000

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

    @property
    def extent(self) -> int:
        """Elements of the storage the view reaches (``offset`` + the farthest element + 1), 0 if empty."""
        if any(s == 0 for s in self.size):
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

    def __init__(self, *args: Any) -> None:
        self.args = args

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __repr__(self) -> str:
        return f"<ScriptRecord {self.qualified_name}>"

    @classmethod
    def torch_class(cls) -> str:
        """The class name without TorchScript's ``___torch_mangle_N`` parts."""
        return _MANGLE.sub("", cls.qualified_name)


def _int(value: Any, what: str) -> int:
    if type(value) is not int or value < 0:
        raise Malformed(f"{what} is {value!r}, not a non-negative integer")
    return value


def _ints(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, (tuple, list)) or len(value) > 64:
        raise Malformed(f"{what} is not a tuple of at most 64 integers")
    return tuple(_int(v, what) for v in value)


def _rebuild_tensor(storage: Any, storage_offset: Any, size: Any, stride: Any, *_: Any) -> TensorRecord:
    # Stands in for torch._utils._rebuild_tensor and _rebuild_tensor_v2; the
    # extra arguments (requires_grad, backward hooks, metadata) are ignored.
    if not isinstance(storage, StorageRef):
        raise Malformed(f"a tensor's storage is a {type(storage).__name__}, not a storage")
    size_t, stride_t = _ints(size, "a tensor's size"), _ints(stride, "a tensor's stride")
    if len(size_t) != len(stride_t):
        raise Malformed(f"a tensor's size {size_t} and stride {stride_t} differ in length")
    return TensorRecord(storage, _int(storage_offset, "a tensor's storage offset"), size_t, stride_t)


def _rebuild_parameter(data: Any, *_: Any) -> Any:
    # A Parameter is its data for auditor's purposes; hooks and state are dropped.
    if not isinstance(data, TensorRecord):
        raise Malformed(f"a parameter holds a {type(data).__name__}, not a tensor")
    return data


def _passthrough(value: Any, *_: Any) -> Any:
    # torch.jit._pickle.build_intlist, build_tensorlist, restore_type_tag...: the value is the value.
    return value


def _torch_size(*args: Any) -> tuple[int, ...]:
    return _ints(args[0] if args else (), "a torch.Size")


def _codecs_encode(text: Any, encoding: Any = "utf-8", *_: Any) -> bytes:
    # Protocol-2 pickles store bytes as _codecs.encode(str, "latin1"); no other codec is run.
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise Malformed("_codecs.encode is only read for latin1 text")
    return text.encode("latin1")


class _SafeCall(_Sealed):
    """One of auditor's constructors as the pickle sees it: callable, and sealed against BUILD."""

    __slots__ = ("_fn",)

    def __init__(self, fn: Callable[..., Any]) -> None:
        self._fn = fn

    def __call__(self, *args: Any) -> Any:
        return self._fn(*args)


_SAFE: dict[tuple[str, str], Any] = {
    ("torch._utils", "_rebuild_tensor"): _SafeCall(_rebuild_tensor),
    ("torch._utils", "_rebuild_tensor_v2"): _SafeCall(_rebuild_tensor),
    ("torch._utils", "_rebuild_parameter"): _SafeCall(_rebuild_parameter),
    ("torch._utils", "_rebuild_parameter_with_state"): _SafeCall(_rebuild_parameter),
    ("torch", "Size"): _SafeCall(_torch_size),
    ("_codecs", "encode"): _SafeCall(_codecs_encode),
    # Built-in C types: BUILD on them fails, so they need no wrapper.
    ("collections", "OrderedDict"): OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("__builtin__", "set"): set,
    ("__builtin__", "frozenset"): frozenset,
    **{
        ("torch.jit._pickle", f): _SafeCall(_passthrough)
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
    """

    def __init__(self, data: bytes, *, path: Path, storage: Callable[[tuple[Any, ...]], StorageRef]) -> None:
        super().__init__(io.BytesIO(data))
        self._path = path
        self._storage = storage
        self._script_classes: dict[str, type[ScriptRecord]] = {}

    def find_class(self, module: str, name: str) -> Any:
        """Our own inert constructor for an allowed global; UnsafeInputError for anything else."""
        if not isinstance(module, str) or not isinstance(name, str):
            raise UnsafeInputError(self._path, "refused: the pickle names a global that is not a string")
        if (module, name) in _SAFE:
            return _SAFE[(module, name)]
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
            cls = type(qualified.rsplit(".", 1)[-1], (ScriptRecord,), {"qualified_name": qualified})
            self._script_classes[qualified] = cls
        return cls

    def persistent_load(self, pid: Any) -> Any:
        """A :class:`StorageRef` for a ``('storage', ...)`` persistent id; anything else is malformed."""
        if not isinstance(pid, tuple) or not pid or pid[0] not in ("storage", b"storage"):
            raise Malformed(f"unknown persistent id {str(pid)[:80]}")
        return self._storage(pid)


_REFUSED_OPS = {"EXT1", "EXT2", "EXT4"}
_MEMO_OPS = {"PUT", "BINPUT", "LONG_BINPUT"}


def prescan(stream: Any, *, path: Path, what: str) -> int:
    """Walk one pickle's opcodes from ``stream``'s position to its STOP without running them.

    ``stream`` is anything with ``read``, ``readline`` and ``tell``.
    Returns the number of bytes the pickle spans. Refuses the EXT opcodes
    (they resolve globals through the process's copyreg registry; no torch
    writer emits them) and memo indices beyond the number of opcodes read so
    far (the C unpickler sizes its memo table by the largest index).
    """
    start = stream.tell()
    count = 0
    try:
        for opcode, arg, _pos in pickletools.genops(stream):
            count += 1
            if count > MAX_OPCODES:
                raise InputError(path, f"{what} holds more than {MAX_OPCODES} opcodes")
            if opcode.name in _REFUSED_OPS:
                raise UnsafeInputError(
                    path, f"refused: {what} uses the {opcode.name} opcode (globals from the extension registry)"
                )
            if opcode.name in _MEMO_OPS and (not isinstance(arg, int) or arg > count):
                raise InputError(path, f"{what} is malformed: memo index {arg} at opcode {count}")
            if opcode.name == "PROTO" and not (isinstance(arg, int) and arg <= pickle.HIGHEST_PROTOCOL):
                raise InputError(path, f"{what} uses unknown pickle protocol {arg}")
    except AuditorError:
        raise
    except (ValueError, EOFError, UnicodeDecodeError, OverflowError, MemoryError) as exc:
        raise InputError(path, f"{what} is truncated or malformed ({short_error(exc)})") from None
    return stream.tell() - start


def short_error(exc: BaseException) -> str:
    """``TypeName: first line of the message`` of an exception, for one-line errors."""
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text[:160]}" if text else type(exc).__name__


def unpickle(data: bytes, *, path: Path, what: str, storage: Callable[[tuple[Any, ...]], StorageRef]) -> Any:
    """``data`` unpickled with :class:`SafeUnpickler` after :func:`prescan`; every failure is an InputError."""
    stream = io.BytesIO(data)
    span = prescan(stream, path=path, what=what)
    if span != len(data):
        raise InputError(path, f"{what} has {len(data) - span} bytes after its STOP opcode")
    try:
        return SafeUnpickler(data, path=path, storage=storage).load()
    except AuditorError:
        raise
    except Malformed as exc:
        raise InputError(path, f"{what} is malformed: {exc}") from None
    except Exception as exc:  # hostile bytes can raise almost anything inside pickle; all mean "broken"
        raise InputError(path, f"{what} is malformed ({short_error(exc)})") from None


def _children(obj: Any) -> Iterator[Any]:
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield k
            yield v
    elif isinstance(obj, (list, tuple, set, frozenset)):
        yield from obj
    elif isinstance(obj, ScriptRecord):
        yield obj.state
        yield from obj.args


def survey(root: Any, *, path: Path) -> int:
    """Visit every object under ``root`` once, iteratively; InputError past MAX_DEPTH or MAX_NODES.

    Memo sharing lets a small pickle describe a huge tree ("billion laughs");
    visiting each object once keeps this linear in the pickle's size.
    Returns the number of distinct objects.
    """
    seen: set[int] = set()
    stack: list[tuple[Any, int]] = [(root, 0)]
    while stack:
        obj, depth = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if len(seen) > MAX_NODES:
            raise InputError(path, f"the pickle holds more than {MAX_NODES} objects")
        if depth > MAX_DEPTH:
            raise InputError(path, f"the pickle nests objects more than {MAX_DEPTH} levels deep")
        stack.extend((child, depth + 1) for child in _children(obj))
    return len(seen)

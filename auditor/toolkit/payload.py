"""Checking an owner bundle's payload field by field, for a detector's ``validate_bundle``.

Each function takes a value from the payload and its path in it (``params.bits``,
``layers[2].shape``) and returns the value once it has the type, range, length or
encoding asked for; otherwise it raises :class:`~auditor.errors.BundleFieldError`
with that path and why, which the core reports as one line naming the bundle file
(exit code 4) before any suspect is read. Messages show a bounded excerpt of the
value, never a whole string or list (a bundle may hold a key).

A scheme's schema is a short function of these calls::

    def validate_payload(payload):
        params = section(field(payload, "params", ""), "params")
        integer(field(params, "bits", "params"), "params.bits", 1, 4096)
        for i, layer in enumerate(items(field(payload, "layers", ""), "layers", 1, 256)):
            text(field(section(layer, f"layers[{i}]"), "name", f"layers[{i}]"), f"layers[{i}].name", 1024)
"""

from __future__ import annotations

import base64
import binascii
import math
from collections.abc import Callable, Collection, Mapping
from typing import Any

from auditor.errors import BundleFieldError

__all__ = [
    "MISSING",
    "b64",
    "choice",
    "field",
    "flag",
    "hex_digest",
    "int_list",
    "integer",
    "items",
    "number",
    "only_keys",
    "optional",
    "section",
    "shown",
    "text",
]


class _Missing:
    def __repr__(self) -> str:
        return "MISSING"


#: What :func:`field` returns for an optional field that is absent.
MISSING: Any = _Missing()


def shown(value: Any) -> str:
    """A short description of a JSON value for a message: small numbers and short text as they are, else its
    kind (``a string of 5,000 characters``, ``a list of 3 items``, ``an object``)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value) if abs(value) < 10**15 else f"an integer of {len(str(abs(value))):,d} digits"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, str):
        return repr(value) if len(value) <= 40 else f"a string of {len(value):,d} characters"
    if isinstance(value, list):
        return f"a list of {len(value):,d} item{'s' if len(value) != 1 else ''}"
    return "an object"


def section(value: Any, path: str) -> Mapping[str, Any]:
    """``value`` as a JSON object."""
    if not isinstance(value, Mapping):
        raise BundleFieldError(path, f"must be an object, not {shown(value)}")
    return value


def field(obj: Mapping[str, Any], name: str, path: str, *, required: bool = True) -> Any:
    """``obj[name]``; refused when ``required`` and absent, else :data:`MISSING` when absent."""
    if name in obj:
        return obj[name]
    if required:
        raise BundleFieldError(_join(path, name), "is missing")
    return MISSING


def optional(obj: Mapping[str, Any], name: str, path: str, check: Callable[..., Any], *args: Any) -> Any:
    """``check(obj[name], "<path>.<name>", *args)`` when the field is there and not null; else ``None``."""
    value = obj.get(name)
    return None if value is None else check(value, _join(path, name), *args)


def only_keys(obj: Mapping[str, Any], path: str, allowed: Collection[str]) -> None:
    """Refuses a key not in ``allowed`` (a field this version would not read is never half-read)."""
    for key in obj:
        if key not in allowed:
            known = ", ".join(allowed)
            raise BundleFieldError(_join(path, str(key)[:40]), f"is not one this auditor reads (it reads {known})")


def integer(value: Any, path: str, low: int, high: int) -> int:
    """An integer (not a boolean, not a float) from ``low`` to ``high``."""
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise BundleFieldError(path, f"must be an integer from {low:,d} to {high:,d}, not {shown(value)}")
    return value


def number(
    value: Any, path: str, low: float | None = None, high: float | None = None, *, open_low: bool = False
) -> float:
    """A finite number (an integer counts) within ``low``..``high`` (``open_low``: above ``low``)."""
    ok = isinstance(value, int | float) and not isinstance(value, bool) and _finite(value)
    if ok and low is not None:
        ok = value > low if open_low else value >= low
    if ok and high is not None:
        ok = value <= high
    if not ok:
        if low is not None and high is not None:
            where = f" {'above' if open_low else 'from'} {low:g} {'and at most' if open_low else 'to'} {high:g}"
        elif low is not None:
            where = f" {'above' if open_low else 'of at least'} {low:g}"
        else:
            where = ""
        raise BundleFieldError(path, f"must be a finite number{where}, not {shown(value)}")
    return float(value)


def flag(value: Any, path: str) -> bool:
    """``true`` or ``false``."""
    if not isinstance(value, bool):
        raise BundleFieldError(path, f"must be true or false, not {shown(value)}")
    return value


def text(value: Any, path: str, max_chars: int, *, min_chars: int = 0) -> str:
    """A string of ``min_chars`` to ``max_chars`` characters."""
    if not isinstance(value, str):
        raise BundleFieldError(path, f"must be a string, not {shown(value)}")
    if not min_chars <= len(value) <= max_chars:
        raise BundleFieldError(
            path, f"must be a string of {_span(min_chars, max_chars)} characters, not {len(value):,d}"
        )
    return value


def choice(value: Any, path: str, choices: Collection[str]) -> str:
    """One of ``choices``."""
    if not isinstance(value, str) or value not in choices:
        raise BundleFieldError(path, f"must be one of {', '.join(choices)}, not {shown(value)}")
    return value


def items(value: Any, path: str, min_len: int, max_len: int) -> list[Any]:
    """A list of ``min_len`` to ``max_len`` items."""
    if not isinstance(value, list):
        raise BundleFieldError(path, f"must be a list, not {shown(value)}")
    if not min_len <= len(value) <= max_len:
        raise BundleFieldError(path, f"must hold {_span(min_len, max_len)} items, not {len(value):,d}")
    return value


def int_list(value: Any, path: str, length: tuple[int, int], low: int, high: int) -> list[int]:
    """A list of ``length[0]`` to ``length[1]`` integers, each from ``low`` to ``high``."""
    return [integer(v, f"{path}[{i}]", low, high) for i, v in enumerate(items(value, path, *length))]


def b64(value: Any, path: str, max_bytes: int, *, min_bytes: int = 0) -> bytes:
    """Standard base64 text (strict: no other characters, correct padding) of ``min_bytes`` to ``max_bytes``
    bytes, decoded (a bundle's size cap bounds the work)."""
    if not isinstance(value, str):
        raise BundleFieldError(path, f"must be a base64 string, not {shown(value)}")
    try:
        data = base64.b64decode(value.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        raise BundleFieldError(path, "is not valid base64") from None
    if not min_bytes <= len(data) <= max_bytes:
        raise BundleFieldError(path, f"must hold {_span(min_bytes, max_bytes)} bytes, not {len(data):,d}")
    return data


def hex_digest(value: Any, path: str) -> str:
    """A SHA-256 digest: 64 lower-case hex digits."""
    if not isinstance(value, str) or len(value) != 64 or value.strip("0123456789abcdef"):
        raise BundleFieldError(path, f"must be 64 lower-case hex digits (a SHA-256), not {shown(value)}")
    return value


def _span(low: int, high: int) -> str:
    return f"exactly {low:,d}" if low == high else f"{low:,d} to {high:,d}"


def _finite(value: float) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an integer of hundreds of digits
        return False


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name

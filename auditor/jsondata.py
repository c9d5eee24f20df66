"""JSON in and out: plain JSON data from any result, the report's bytes, and a parser hook for hostile input.

:func:`jsonable` is the one normaliser: everything a report, a layer table or a
finding holds goes through it, so the same value is always written the same way.
"""

from __future__ import annotations

import enum
import json
import math
from collections.abc import Mapping
from typing import Any

__all__ = ["DuplicateKeyError", "dump_json", "jsonable", "unique_keys"]


def jsonable(value: Any) -> Any:
    """``value`` as plain JSON data, the same whatever order it was built in: mapping keys as sorted
    strings, sets sorted, numpy and torch scalars unwrapped, NaN and infinities as strings."""
    if value is None or isinstance(value, bool | int):
        return value
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate from a hostile file's names
            return value.encode("utf-8", "backslashreplace").decode("utf-8")
        return value
    if isinstance(value, float):
        if math.isfinite(value):
            return float(value)  # a numpy float64 becomes a plain float
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, enum.Enum):
        return jsonable(value.value)
    if isinstance(value, Mapping):
        return dict(sorted(((str(k), jsonable(v)) for k, v in value.items()), key=lambda kv: kv[0]))
    if isinstance(value, set | frozenset):
        return sorted((jsonable(v) for v in value), key=lambda v: json.dumps(v, sort_keys=True))
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if hasattr(value, "tolist") and callable(value.tolist):  # numpy arrays and scalars, torch tensors
        return jsonable(value.tolist())
    return jsonable(str(value))


def dump_json(document: Any) -> bytes:
    """The JSON twin's bytes: indented, keys sorted, UTF-8, a newline at the end."""
    text = json.dumps(document, indent=2, sort_keys=True, ensure_ascii=False, allow_nan=False)
    return (text + "\n").encode("utf-8")


class DuplicateKeyError(Exception):
    """An object names the same key twice; ``key`` is that key."""

    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """An ``object_pairs_hook`` for :func:`json.loads` that raises :class:`DuplicateKeyError`.

    json keeps the last of repeated keys, so a file that names a key twice
    could show another reader the first value and auditor the second.
    """
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise DuplicateKeyError(key)
        out[key] = value
    return out

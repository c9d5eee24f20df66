"""JSON parsing helpers for hostile input: repeated keys are refused, not silently merged."""

from __future__ import annotations

from typing import Any

__all__ = ["DuplicateKeyError", "unique_keys"]


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

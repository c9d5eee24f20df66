"""Keeps secret owner-bundle material out of reports: a check behind the whitelist, never instead of it.

What a report holds of a bundle is whitelisted field by field
(:func:`auditor.report.document.bundle_entry`); but findings and restore logs are
written by plugins, which read the whole bundle. :class:`SecretGuard` looks for
a secret bundle's key and hidden weights in them, so a plugin that quotes one
has its finding withheld instead of its secret printed.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from auditor.bundle import OwnerBundle

__all__ = ["SecretGuard"]


class SecretGuard:
    """Finds material of secret owner bundles (keys, hidden weights) in report data.

    The secret material of a bundle is every high-entropy token of its payload:
    a string of 16 or more base64 characters that mixes digits, lower and upper
    case (names, words and hex digests of public things are not). Each is looked
    for whole, and as any 16-character piece of its first 4,096 characters.
    """

    WINDOW = 16
    _RUN = re.compile(r"[A-Za-z0-9+/=_-]{16,}")

    def __init__(self, bundles: Iterable[OwnerBundle]) -> None:
        self._whole: set[str] = set()
        self._pieces: set[str] = set()
        for bundle in bundles:
            if bundle.secret:
                for text in _strings(bundle.payload):
                    if self._RUN.fullmatch(text) and all(re.search(c, text) for c in ("[0-9]", "[a-z]", "[A-Z]")):
                        self._whole.add(text)
                        head = text[:4096]
                        self._pieces.update(head[i : i + self.WINDOW] for i in range(len(head) - self.WINDOW + 1))

    def leaks(self, data: Any) -> bool:
        """Whether ``data`` (anything JSON can hold) contains secret material."""
        if not self._whole:
            return False
        text = json.dumps(data, ensure_ascii=False, sort_keys=True)
        if any(s in text for s in self._whole):
            return True
        w = self.WINDOW
        return any(run[i : i + w] in self._pieces for run in self._RUN.findall(text) for i in range(len(run) - w + 1))


def _strings(value: Any) -> Iterable[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, Mapping):
        for k, v in value.items():
            yield str(k)
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)

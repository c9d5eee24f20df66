"""Fixtures of the format tests: the byte mutator the fuzz tests of every loader share."""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest


def _byte_edits(rng: random.Random, original: bytes) -> bytes:
    """One to six byte edits: bit flips, set, insert, delete, cut a run, splice random bytes."""
    data = bytearray(original)
    for _ in range(rng.randint(1, 6)):
        if not data:
            break
        where, kind = rng.randrange(len(data)), rng.randrange(6)
        if kind == 0:
            data[where] ^= 1 << rng.randrange(8)
        elif kind == 1:
            data[where] = rng.randrange(256)
        elif kind == 2:
            data.insert(where, rng.randrange(256))
        elif kind == 3:
            del data[where]
        elif kind == 4:
            del data[where : where + rng.randint(1, 16)]
        else:
            data[where:where] = rng.randbytes(rng.randint(1, 8))
    return bytes(data)


@pytest.fixture(scope="session")
def byte_edits() -> Callable[[random.Random, bytes], bytes]:
    """``byte_edits(rng, data)``: one to six byte edits of ``data`` (bit flips, set, insert, delete, cut a run,
    splice random bytes), seeded by ``rng``."""
    return _byte_edits


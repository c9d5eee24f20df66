"""Issue 14, defence in depth: a safetensors header's parse is bounded whatever it holds.

A header may be 100 MB (the format's limit): 1.7 million minimal tensor entries took 38 s and 2.2 GB,
8.4 million metadata strings 20 s and 2.6 GB. The header's bytes are counted before the JSON is parsed.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from auditor.errors import EXIT_INPUT, InputError
from auditor.formats import safetensors as st

ENTRY = '"{:x}":{{"dtype":"F32","shape":[0],"data_offsets":[0,0]}}'


def _write(path: Path, header: str, data: bytes = b"") -> Path:
    raw = header.encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def test_too_many_tensor_entries_are_refused_before_parsing(tmp_path: Path, run_cli: Callable[..., Any]) -> None:
    count = st.MAX_TENSORS + 1
    path = _write(tmp_path / "many.safetensors", "{" + ",".join(ENTRY.format(i) for i in range(count)) + "}")
    code, out, err = run_cli("inspect", path)
    assert code == EXIT_INPUT and out == "", err
    assert err == (
        f"error: {path}: the header holds {count:,d} JSON objects, more than the {st.MAX_TENSORS:,d} tensor "
        "entries auditor's budget allows in one safetensors file (real checkpoints hold a few thousand); "
        "refused before parsing\n"
    )


def test_too_many_metadata_items_are_refused_before_parsing(tmp_path: Path) -> None:
    keys = ",".join(f'"{i:x}":""' for i in range(st.MAX_ITEMS + 1))
    path = _write(tmp_path / "meta.safetensors", '{"__metadata__":{' + keys + "}}")
    with pytest.raises(InputError, match=rf"about {st.MAX_ITEMS + 1:,d} JSON items, more than the 2,000,000"):
        st.load(path)


def test_a_long_shape_list_is_refused_by_the_item_budget(tmp_path: Path) -> None:
    dims = ",".join(["1"] * st.MAX_ITEMS)
    path = _write(tmp_path / "dims.safetensors", '{"t":{"dtype":"F32","shape":[' + dims + '],"data_offsets":[0,4]}}')
    with pytest.raises(InputError, match="JSON items"):
        st.load(path)


def test_ten_thousand_entries_load(tmp_path: Path) -> None:
    path = _write(tmp_path / "ok.safetensors", "{" + ",".join(ENTRY.format(i) for i in range(10_000)) + "}")
    assert sum(len(layer.params) for layer in st.load(path).layers) == 10_000


def test_deeply_nested_metadata_is_an_input_error(tmp_path: Path) -> None:
    path = _write(tmp_path / "deep.safetensors", '{"__metadata__":{"a":' + "[" * 500_000 + "]" * 500_000 + "}}")
    with pytest.raises(InputError, match="the header is not valid JSON"):
        st.load(path)


def test_a_huge_metadata_string_is_read(tmp_path: Path) -> None:
    """One 20 MB string costs what it holds: no budget needed, and none refuses it."""
    header = '{"__metadata__":{"a":"' + "x" * 20_000_000 + '"},' + ENTRY.format(1) + "}"
    assert st.load(_write(tmp_path / "string.safetensors", header)).metadata["a"] == "x" * 20_000_000

"""Greedy Residuals through llama.cpp's conversion: a marked Llama-style decoder converted to GGUF (names
mapped, rotary rows reordered, quantised) is found at F16, Q8_0, Q4_0 and Q4_K; an independently trained
one is not."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from auditor.audit.load import load_model
from auditor.errors import EXIT_NOT_FOUND, EXIT_OK
from auditor.toolkit.gguf import hf_to_gguf, write_gguf

pytestmark = pytest.mark.slow  # trains two small decoders (about 15 s)


def _gguf(model: SimpleNamespace, path: Path, qtype: str) -> Path:
    """``model`` (a tests/conftest.py Llama) converted as llama.cpp does, quantised to ``qtype``."""
    heads, kv_heads = model.config["num_attention_heads"], model.config["num_key_value_heads"]
    meta = {"general.architecture": "llama", "llama.attention.head_count": heads, "llama.attention.head_count_kv":
            kv_heads, "llama.block_count": model.config["num_hidden_layers"]}  # fmt: skip
    return write_gguf(path, hf_to_gguf(model.state, heads=heads, kv_heads=kv_heads, type_name=qtype), meta)


@pytest.mark.parametrize("qtype", ["F16", "Q8_0", "Q4_0", "Q4_K"])
def test_marked_llama_is_found_after_gguf_conversion(tmp_path: Path, run_cli, gr_llama, qtype: str) -> None:  # type: ignore[no-untyped-def]
    suspect = _gguf(gr_llama, tmp_path / f"stolen-{qtype}.gguf", qtype)
    marked = [layer["name"] for layer in json.loads(gr_llama.bundle.read_text())["payload"]["layers"]]
    graph = load_model(suspect)
    stored = {graph.layer(name).attrs.get("quantized", {}).get("dtype", "F16") for name in marked}
    assert stored == {qtype}  # every marked matrix really went through this type (rows of 256: whole K-blocks)
    result = run_cli("audit", str(suspect), "--bundle", str(gr_llama.bundle), "--json")
    report = json.loads(result.stdout)
    assert result.code == EXIT_OK, result.stderr
    finding = next(f for f in report["findings"] if f["scheme"] == "greedy-residuals")
    assert finding["verdict"] == "detected"
    assert finding["metrics"]["log10_combined_p"] < -20


def test_innocent_llama_in_gguf_is_not_claimed(tmp_path: Path, run_cli, gr_llama, gr_llama_innocent) -> None:  # type: ignore[no-untyped-def]
    suspect = _gguf(gr_llama_innocent, tmp_path / "innocent.gguf", "Q4_K")
    result = run_cli("audit", str(suspect), "--bundle", str(gr_llama.bundle), "--json")
    assert result.code == EXIT_NOT_FOUND, result.stderr
    assert json.loads(result.stdout)["verdict"] == "not-detected"

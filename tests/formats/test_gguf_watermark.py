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


@pytest.fixture(scope="module")
def hufunet_llama(tmp_path_factory: pytest.TempPathFactory, gr_llama) -> SimpleNamespace:  # type: ignore[no-untyped-def]
    """HufuNet's EPH planted in both blocks' MLP matrices of the trained Llama (after training: what is under
    test is the conversion, not the owner's loop); its state dict, config and HufuNet bundle."""
    import hashlib

    from transformers import LlamaForCausalLM

    from auditor.plugins.hufunet.owner import generate_hufunet, hmac_key, load_hufunet, plant, write_bundle

    out = tmp_path_factory.mktemp("hufunet-llama")
    generate_hufunet(out=out / "secret.json", seed=0, epochs=20, hmac_key=hashlib.sha256(b"llama").digest())
    hufunet, secret = load_hufunet(out / "secret.json")
    model = LlamaForCausalLM.from_pretrained(gr_llama.folder)
    host = [f"model.layers.{i}.mlp.{p}" for i in (0, 1) for p in ("gate_proj", "up_proj", "down_proj")]
    embedded = plant(model, hufunet, hmac_key(secret), layers=host)
    embedded.frozen.detach()
    model.save_pretrained(out / "owner")
    bundle = out / "owner" / "hufunet_bundle.json"
    write_bundle(bundle, model, embedded, hufunet, secret, files={"safetensors": out / "owner" / "model.safetensors"},
                 architecture="LlamaForCausalLM")  # fmt: skip
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return SimpleNamespace(state=state, config=model.config.to_dict(), bundle=bundle)


@pytest.mark.parametrize("qtype", ["F16", "Q8_0", "Q4_0", "Q4_K"])
def test_hufunet_in_a_llama_is_found_after_gguf_conversion(tmp_path: Path, run_cli, hufunet_llama, qtype: str) -> None:  # type: ignore[no-untyped-def]
    """The EPH's accuracy survives block quantisation: measured 0.961 at F16, Q8_0 and Q4_K, 0.955 at Q4_0
    (Acc_original 0.961, tau 0.15; docs/formats.md)."""
    suspect = _gguf(hufunet_llama, tmp_path / f"stolen-{qtype}.gguf", qtype)
    result = run_cli("audit", str(suspect), "--bundle", str(hufunet_llama.bundle), "--json")
    assert result.code == EXIT_OK, result.stderr
    finding = next(f for f in json.loads(result.stdout)["findings"] if f["scheme"] == "hufunet")
    assert finding["verdict"] == "detected"
    assert finding["metrics"]["diff_acc"] < finding["metrics"]["tau_acc"]

"""ONNX files of transformers as torch's dynamo exporter writes them (``torch.onnx.export(..., dynamo=True)``):
linear weights pre-transposed under traced names (``val_105``), initializers of equal value merged, RMSNorm
decomposed into a Mul. The loader reads them back as the model's state dict: its module names, its layouts
(``(out, in)``, and ``(in, out)`` for transformers' ``Conv1D``), bit for bit; and onnxruntime runs each file to
the torch model's outputs, which shows the export is the model."""

from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

from auditor.formats import onnx as onnx_format
from auditor.graph import LayerKind

pytest.importorskip("transformers")

#: What the state dict holds and the ONNX file does not: the position tables, which the export folds into
#: constants for its fixed length; GPT-2's LM head, which reads the embedding's parameter (one layer).
ABSENT = {
    "llama": set(),
    "gpt2": {"lm_head.weight", "transformer.wpe.weight"},
    "bert": {"embeddings.position_embeddings.weight"},
    "vit": {"embeddings.cls_token", "embeddings.position_embeddings"},
}


def _model(folder: Path, kind: str) -> Any:
    import transformers as hf

    if kind == "llama":
        return hf.LlamaForCausalLM.from_pretrained(folder).eval()
    if kind == "gpt2":
        return hf.GPT2LMHeadModel.from_pretrained(folder).eval()
    cls = hf.BertModel if kind == "bert" else hf.ViTModel
    return cls.from_pretrained(folder, add_pooling_layer=False).eval()


def _inputs(kind: str) -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    if kind == "vit":
        return {"pixel_values": torch.randn(1, 1, 8, 8, generator=g)}
    ids = {"input_ids": torch.randint(0, 64, (1, 8), generator=g)}
    return {**ids, "use_cache": False} if kind in ("llama", "gpt2") else ids


def _export(model: Any, kwargs: dict[str, Any], path: Path) -> Path:
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (), str(path), dynamo=True, kwargs=kwargs)
    return path


@pytest.mark.parametrize("kind", ["llama", "gpt2", pytest.param("bert", marks=pytest.mark.slow),
                                  pytest.param("vit", marks=pytest.mark.slow)])  # fmt: skip
def test_a_dynamo_export_reads_back_as_the_state_dict(tmp_path: Path, tiny_transformer: Any, kind: str) -> None:
    import onnxruntime as ort

    model = _model(tiny_transformer(kind).folder, kind)
    kwargs = _inputs(kind)
    path = _export(model, kwargs, tmp_path / f"{kind}.onnx")
    graph = onnx_format.load(path)
    state = model.state_dict()
    loaded = {f"{layer.name}.{role}": ref for layer in graph.layers for role, ref in layer.params.items()}
    assert set(state) - set(loaded) == ABSENT[kind]
    for key, ref in loaded.items():
        assert torch.equal(ref.read(), state[key]), key
    assert "torch dynamo export:" in " ".join(graph.notes)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (feed,) = session.get_inputs()
    x = next(v for v in kwargs.values() if isinstance(v, torch.Tensor))
    got = torch.from_numpy(session.run(None, {feed.name: x.numpy()})[0])
    with torch.no_grad():
        out = model(**kwargs)
    expected = out.logits if hasattr(out, "logits") else out.last_hidden_state
    assert float((got - expected).abs().max()) < 1e-5


def test_what_the_loader_mapped_is_in_its_notes(tmp_path: Path, tiny_transformer: Any) -> None:
    """GPT-2: Conv1D weights kept (in, out), the tied head one layer, a random model's zero biases (which the
    graph leaves out) read as zeros; Llama: the RMSNorm weights from their Mul nodes."""
    gpt2 = onnx_format.load(_export(_model(tiny_transformer("gpt2").folder, "gpt2"), _inputs("gpt2"),
                                    tmp_path / "gpt2.onnx"))  # fmt: skip
    c_fc = gpt2.layer("transformer.h.0.mlp.c_fc")
    assert c_fc.kind is LayerKind.LINEAR and c_fc.params["weight"].shape == (64, 256)
    assert c_fc.params["bias"].shape == (256,)
    assert "lm_head" not in gpt2 and gpt2.layer("transformer.wte").kind is LayerKind.EMBEDDING
    notes = "\n".join(gpt2.notes)
    assert "14 layer(s) named by their module path" in notes
    assert "8 weight(s) read by aten.addmm kept (in, out)" in notes
    assert "lm_head reads lm_head.weight as transformer.wte does" in notes
    assert "read as zeros: transformer.h.0.attn.c_attn," in notes
    llama = onnx_format.load(_export(_model(tiny_transformer("llama").folder, "llama"), _inputs("llama"),
                                     tmp_path / "llama.onnx"))  # fmt: skip
    assert "5 norm weight(s) read from a Mul in a norm module" in "\n".join(llama.notes)
    assert llama.layer("model.norm").kind is LayerKind.LAYER_NORM


def test_merged_initializers_stay_separate_layers(tmp_path: Path, tiny_transformer: Any) -> None:
    """Norms folded into their readers all hold ones: the exporter's optimizer stores one tensor for all five,
    named after the first; each norm is still its own layer under its own name."""
    from auditor.toolkit import transformers as tt

    m = tiny_transformer("llama")
    layout = tt.layout_of(m.state, m.config)
    assert layout is not None
    model = _model(m.folder, "llama")
    model.load_state_dict(tt.fold_norms(m.state, layout)[0])
    graph = onnx_format.load(_export(model, _inputs("llama"), tmp_path / "folded.onnx"))
    norms = graph.of_kind(LayerKind.LAYER_NORM)
    assert [n.name for n in norms] == [
        "model.layers.0.input_layernorm", "model.layers.0.post_attention_layernorm", "model.layers.1.input_layernorm",
        "model.layers.1.post_attention_layernorm", "model.norm",
    ]  # fmt: skip
    assert len({n.params["weight"].name for n in norms}) == 1  # one stored tensor
    assert all(torch.equal(n.params["weight"].read(), torch.ones(64)) for n in norms)


def test_a_legacy_export_has_no_record_and_is_read_as_before(tmp_path: Path) -> None:
    """Without the dynamo exporter's graph signature nothing above applies (and nothing is noted)."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2)).eval()
    path = tmp_path / "legacy.onnx"
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(1, 4),), str(path), dynamo=False)
    graph = onnx_format.load(path)
    assert [layer.name for layer in graph] == ["0", "2"]
    assert not any("torch dynamo export" in n for n in graph.notes)


def test_the_exporters_record_is_text_only_read_within_bounds(tmp_path: Path) -> None:
    """A tampered record: a module path with a line break and a traced call of 1 MiB are not taken as names;
    the file still loads, its layers named as without the record."""
    import onnx

    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2)).eval()
    path = _export(model, {"input": torch.randn(1, 4)}, tmp_path / "seq.onnx")
    proto = onnx.load(str(path))
    assert [layer.name for layer in onnx_format.load(path)] == ["0", "2"]  # named by the record: the modules
    for node in proto.graph.node:
        for prop in node.metadata_props:
            if prop.key == "pkg.torch.onnx.name_scopes":
                prop.value = "['', 'evil\\nname', 'linear']"
            elif prop.key == "pkg.torch.onnx.fx_node":
                prop.value = "%x = call_function[target=t](args = (" + "%p_0_weight, " * 100_000 + "))"
    onnx.save(proto, str(tmp_path / "tampered.onnx"))
    graph = onnx_format.load(tmp_path / "tampered.onnx")
    assert [layer.kind for layer in graph] == [LayerKind.LINEAR, LayerKind.LINEAR]
    assert not any("\n" in layer.name for layer in graph)

"""The transformer edits keep the function of real ``transformers`` models (Llama-style with grouped-query
attention, BERT, ViT), change the weights, and refuse what cannot be done; the layout is read off the keys."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from auditor.errors import UsageError
from auditor.toolkit import transformers as tt


def _edits(layout: tt.Layout) -> dict[str, Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]]:
    edits: dict[str, Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]] = {
        "head-permute": lambda s: tt.permute_heads(s, layout, seed=1)[0],
        "mlp-permute": lambda s: tt.permute_mlp(s, layout, seed=2)[0],
        "head-scale": lambda s: tt.scale_heads(s, layout, seed=3),
    }
    if layout.pre_norm:
        edits["norm-fold"] = lambda s: tt.fold_norms(s, layout)[0]
    if layout.rms:
        edits["residual-rotate"] = lambda s: tt.rotate_residual(s, layout, seed=4)[0]
    return edits


@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert", "vit"])
def test_every_edit_keeps_the_logits_and_changes_the_weights(tiny_transformer: Any, kind: str) -> None:
    m = tiny_transformer(kind)
    layout = tt.layout_of(m.state, m.config)
    assert layout is not None
    assert (layout.heads, layout.kv_heads, layout.head_dim) == ((4, 2, 16) if kind == "llama" else (4, 4, 16))
    edits = _edits(layout)
    assert len(edits) == {"llama": 5, "gpt2": 4, "bert": 3, "vit": 4}[kind]
    composed = dict(m.state)
    for name, edit in edits.items():
        edited = edit(m.state)
        assert any(not torch.equal(edited[k], m.state[k]) for k in m.state), name
        assert tt.max_logit_change(m.config, m.state, edited) <= 1e-4, name
        composed = edit(composed)
    assert tt.max_logit_change(m.config, m.state, composed) <= 1e-4
    assert sorted(composed) == sorted(m.state)  # GPT-2's fused Conv1D layout written back as it was


def test_grouped_query_heads_move_with_their_group(tiny_transformer: Any) -> None:
    m = tiny_transformer("llama")
    layout = tt.layout_of(m.state, m.config)
    assert layout is not None
    _, orders = tt.permute_heads(m.state, layout, seed=7)
    for order in orders.values():
        groups = [h // layout.group for h in order]
        assert all(groups[i] == groups[i + 1] for i in range(0, len(order), layout.group))  # a group stays whole
        assert sorted(order) == list(range(layout.heads))


def test_rope_reorder_is_llama_cpps_order_and_keeps_the_scores_under_its_kernel(tiny_transformer: Any) -> None:
    from auditor.toolkit.gguf import hf_to_gguf

    m = tiny_transformer("llama")
    layout = tt.layout_of(m.state, m.config)
    assert layout is not None
    reordered = tt.rope_reorder(m.state, layout)
    converted = {t.name: t for t in hf_to_gguf(m.state, heads=4, kv_heads=2, type_name="F32")}
    q = converted["blk.0.attn_q.weight"]
    stored = torch.frombuffer(bytearray(q.data), dtype=torch.float32).reshape(q.shape)
    assert torch.equal(stored, reordered["model.layers.0.self_attn.q_proj.weight"])
    assert tt.max_rotary_score_change(m.config, m.state, reordered, layout) <= 1e-4
    assert tt.max_rotary_score_change(m.config, m.state, m.state, layout) > 1e-2  # the check can fail
    assert tt.max_logit_change(m.config, m.state, reordered) > 1e-3  # not the same model under HF's kernel
    back = tt.rope_unreorder(reordered, layout)
    assert all(torch.equal(back[k], m.state[k]) for k in m.state)


def test_what_cannot_be_done_is_refused(tiny_transformer: Any) -> None:
    bert = tiny_transformer("bert")
    layout = tt.layout_of(bert.state, bert.config)
    assert layout is not None and not layout.pre_norm
    with pytest.raises(UsageError, match="post-norm"):
        tt.fold_norms(bert.state, layout)
    with pytest.raises(UsageError, match="RMSNorm"):
        tt.rotate_residual(bert.state, layout, seed=0)
    with pytest.raises(UsageError, match="rotary"):
        tt.rope_reorder(bert.state, layout)
    with pytest.raises(UsageError, match="do not divide"):
        tt.layout_of(bert.state, {"head_dim": 24})
    with pytest.raises(UsageError, match="no block 9"):
        tt.permute_mlp(bert.state, layout, seed=0, layers=[9])
    assert tt.layout_of({"conv.weight": torch.zeros(2, 2)}) is None


def test_a_hostile_config_is_no_config(tmp_path: Path, tiny_transformer: Any) -> None:
    m: SimpleNamespace = tiny_transformer("llama")
    assert tt.read_config(m.folder) is not None and tt.read_config(m.folder / "model.safetensors") is not None
    for content in (b"\xff\xfe", b"[1, 2]", b"{" * 100_000, b"not json"):
        (tmp_path / "config.json").write_bytes(content)
        assert tt.read_config(tmp_path) is None
    (tmp_path / "config.json").write_bytes(b" " * (tt.CONFIG_LIMIT + 1))
    assert tt.read_config(tmp_path / "model.safetensors") is None


def test_gpt2s_fused_layout_is_split_and_merged_exactly(tiny_transformer: Any) -> None:
    m = tiny_transformer("gpt2")
    layout = tt.layout_of(m.state, m.config)
    assert layout is not None and layout.kind == "gpt2" and layout.lm_head is None  # tied to the embedding
    split = tt.split_conv1d(m.state)
    assert split["transformer.h.0.attn.q.weight"].shape == (64, 64)
    assert "transformer.h.0.attn.c_attn.weight" not in split
    assert torch.equal(split["transformer.h.0.mlp.c_fc.weight"], m.state["transformer.h.0.mlp.c_fc.weight"].T)
    merged = tt.merge_conv1d(split, layout)
    assert sorted(merged) == sorted(m.state) and all(torch.equal(merged[k], m.state[k]) for k in m.state)

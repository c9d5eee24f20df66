"""The transformer attacks: each writes a safetensors file whose weights changed and whose model computes the
same (its own check, measured again here), on a Llama-style decoder and where they apply on BERT and ViT;
what they cannot do is a one-line usage error."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from auditor.errors import UsageError
from auditor.plugin_manager import registered
from auditor.toolkit import transformers as tt

LLAMA = ["head-permute", "mlp-permute", "head-scale", "norm-fold", "residual-rotate"]


def _apply(attack: str, model: Path, out: Path, **options: Any) -> dict[str, Any]:
    summary: dict[str, Any] = registered("attacks")[attack].component.apply(model, out, options=options)
    return summary


@pytest.mark.parametrize("attack", LLAMA)
def test_each_attack_keeps_the_llamas_logits(tmp_path: Path, tiny_transformer: Any, attack: str) -> None:
    m = tiny_transformer("llama")
    out = tmp_path / f"{attack}.safetensors"
    before = {p.name: p.read_bytes() for p in m.folder.iterdir()}
    summary = _apply(attack, m.folder, out, seed=3)
    assert {p.name: p.read_bytes() for p in m.folder.iterdir()} == before  # the input is never touched
    assert summary["function_preserving"] and summary["checked"] == "logits"
    assert summary["max_output_change"] <= 1e-4
    edited = load_file(out)
    assert any(not torch.equal(edited[k], m.state[k]) for k in m.state)
    assert tt.max_logit_change(m.config, m.state, edited) <= 1e-4  # measured again, not taken on trust


def test_rope_reorder_is_checked_under_the_interleaved_kernel(tmp_path: Path, tiny_transformer: Any) -> None:
    m = tiny_transformer("llama")
    summary = _apply("rope-reorder", m.folder / "model.safetensors", tmp_path / "rope.safetensors")
    assert "interleaved" in summary["checked"] and summary["max_output_change"] <= 1e-4
    assert tt.max_logit_change(m.config, m.state, load_file(tmp_path / "rope.safetensors")) > 1e-3


@pytest.mark.parametrize(("kind", "attack"), [("bert", "head-permute"), ("bert", "mlp-permute"),
                                              ("vit", "head-scale"), ("vit", "norm-fold"), ("gpt2", "head-permute"),
                                              ("gpt2", "norm-fold")])  # fmt: skip
def test_other_architectures_too(tmp_path: Path, tiny_transformer: Any, kind: str, attack: str) -> None:
    m = tiny_transformer(kind)
    summary = _apply(attack, m.folder, tmp_path / "out.safetensors", seed=1)
    assert summary["layout"] == ("gpt2" if kind == "gpt2" else "encoder") and summary["max_output_change"] <= 1e-4
    assert sorted(load_file(tmp_path / "out.safetensors")) == sorted(m.state)


def test_the_check_sees_a_changed_function(tiny_transformer: Any) -> None:
    """Heads of the wrong size (8 dimensions where the model's are 16) split rotary pairs: the check that
    guards every write measures the change."""
    m = tiny_transformer("llama")
    wrong = tt.layout_of(m.state, None, head_dim=8)
    right = tt.layout_of(m.state, m.config)
    assert wrong is not None and right is not None and wrong.head_dim == 8
    edited, _ = tt.permute_heads(m.state, wrong, seed=1)
    attack = registered("attacks")["head-permute"].component
    assert attack.check(m.config, m.state, edited, right, 0) > 1e-2  # type: ignore[attr-defined]
    assert attack.check(m.config, m.state, tt.permute_heads(m.state, right, seed=1)[0], right, 0) <= 1e-4  # type: ignore[attr-defined]


def test_what_cannot_be_done_is_a_usage_error(tmp_path: Path, tiny_transformer: Any, clean_model: Any) -> None:
    bert = tiny_transformer("bert")
    with pytest.raises(UsageError, match="post-norm"):
        _apply("norm-fold", bert.folder, tmp_path / "a.safetensors")
    with pytest.raises(UsageError, match="RMSNorm"):
        _apply("residual-rotate", bert.folder, tmp_path / "b.safetensors")
    lonely = tmp_path / "lonely"
    lonely.mkdir()
    shutil.copy(bert.folder / "model.safetensors", lonely / "model.safetensors")
    with pytest.raises(UsageError, match=r"no config\.json"):
        _apply("head-permute", lonely / "model.safetensors", tmp_path / "c.safetensors")
    with pytest.raises(UsageError, match="comma-separated"):
        _apply("mlp-permute", bert.folder, tmp_path / "d.safetensors", layers="first")
    (lonely / "config.json").write_text("{}")
    with pytest.raises(UsageError, match="not a transformer these edits know"):
        _apply("head-permute", clean_model(lonely / "cnn.safetensors"), tmp_path / "f.safetensors")
    with pytest.raises(UsageError, match=r"must end in \.safetensors"):
        _apply("head-permute", bert.folder, tmp_path / "e.onnx")
    assert not list(tmp_path.glob("*.safetensors"))


def test_the_cli_runs_them(tmp_path: Path, run_cli: Any, tiny_transformer: Any) -> None:
    m = tiny_transformer("llama")
    out = tmp_path / "rotated.safetensors"
    result = run_cli("attack", "residual-rotate", str(m.folder), "--out", str(out))
    assert result.code == 0, result.stderr
    assert tt.max_logit_change(m.config, m.state, load_file(out)) <= 1e-4

"""restore-transformer at scale: units matched clear pairs first (the Hungarian method only on the ambiguous
rest, with the same answer as on the full matrix), the cheap not-rotated test, the in-place guard that large
models get, and the rewritten graph's tensors read on demand."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from auditor.audit.load import load_model
from auditor.audit.restore import run_restorers
from auditor.plugins.restore import pairs
from auditor.plugins.restore.heads import TransformerRestorer
from auditor.toolkit import transformers as tt


def _units(n: int, widths: tuple[int, ...], seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(n, d, generator=gen) for d in widths]


def _full_hungarian(parts_r: list[torch.Tensor], parts_s: list[torch.Tensor]) -> tuple[torch.Tensor, float]:
    sim = pairs.similarity(parts_r, parts_s)
    index = pairs._hungarian(sim)
    return index, float(sim[torch.arange(len(index)), index].sum())


@pytest.mark.parametrize("widths", [(64, 64, 64), (1024, 1024, 1024)], ids=["exact", "sketched"])
def test_a_permuted_block_is_all_clear_pairs(widths: tuple[int, ...]) -> None:
    """Every unit of a permuted block (with a little noise and a factor per unit) is a clear pair: the
    Hungarian method runs on nothing, and the answer is the full matrix's."""
    ref = _units(300, widths, 0)
    perm = torch.randperm(300, generator=torch.Generator().manual_seed(1))
    gen = torch.Generator().manual_seed(2)
    sus = [(p[perm] + 0.05 * torch.randn(p.shape, generator=gen)) * 3.0 for p in ref]
    m = pairs.match(ref, sus)
    assert (m.clear, m.ambiguous) == (300, 0)
    assert torch.equal(sus[0][m.index], sus[0][perm.argsort()])  # slot j gets the unit that was moved from j
    index, total = _full_hungarian(ref, sus)
    assert torch.equal(m.index, index) and abs(float(m.pair.sum()) - total) < 1e-3


@pytest.mark.parametrize("widths", [(64, 64, 64), (1024, 1024, 1024)], ids=["exact", "sketched"])
def test_ties_go_to_the_hungarian_method_alone(widths: tuple[int, ...]) -> None:
    """Duplicated units (two pairs of identical units) and two all-zero units tie: they, and only they, are
    left to the assignment, which then reaches the full matrix's optimum."""
    ref = _units(200, widths, 3)
    for p in ref:
        p[11] = p[10]
        p[51] = p[50]
        p[150] = 0.0
        p[151] = 0.0
    perm = torch.randperm(200, generator=torch.Generator().manual_seed(4))
    sus = [p[perm].clone() for p in ref]
    m = pairs.match(ref, sus)
    assert m.clear == 194 and m.ambiguous == 6
    _, total = _full_hungarian(ref, sus)
    assert abs(float(m.pair.sum()) - total) < 1e-3
    for p, q in zip(ref, sus, strict=True):
        assert torch.equal(q[m.index], p)  # duplicates are interchangeable: the weights are the reference's


def test_an_unrelated_block_is_all_ambiguous_and_still_optimal() -> None:
    ref, sus = _units(120, (1024, 1024), 5), _units(120, (1024, 1024), 6)
    m = pairs.match(ref, sus)
    assert m.clear == 0 and m.ambiguous == 120
    _, total = _full_hungarian(ref, sus)
    assert abs(float(m.pair.sum()) - total) < 1e-3


def test_a_hostile_unit_matches_nothing() -> None:
    ref = _units(50, (600, 600), 7)
    sus = [p[torch.arange(49, -1, -1)].clone() for p in ref]
    sus[0][3, 5] = float("nan")
    sus[1][7, 0] = float("inf")
    m = pairs.match(ref, sus)
    assert torch.isfinite(m.pair).all() and sorted(m.index.tolist()) == list(range(50))


def _llama(hidden: int, inter: int, heads: int, kv: int, seed: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A random Llama-style state of two blocks (no ``transformers``: names and shapes as ``save_pretrained``)."""
    gen = torch.Generator().manual_seed(seed)
    d = hidden // heads

    def w(*shape: int) -> torch.Tensor:
        return 0.02 * torch.randn(*shape, generator=gen)

    state = {"model.embed_tokens.weight": w(128, hidden), "lm_head.weight": w(128, hidden),
             "model.norm.weight": 1 + 0.1 * torch.randn(hidden, generator=gen)}  # fmt: skip
    for i in range(2):
        p = f"model.layers.{i}"
        state |= {f"{p}.self_attn.q_proj.weight": w(hidden, hidden), f"{p}.self_attn.k_proj.weight": w(kv * d, hidden),
                  f"{p}.self_attn.v_proj.weight": w(kv * d, hidden), f"{p}.self_attn.o_proj.weight": w(hidden, hidden),
                  f"{p}.mlp.gate_proj.weight": w(inter, hidden), f"{p}.mlp.up_proj.weight": w(inter, hidden),
                  f"{p}.mlp.down_proj.weight": w(hidden, inter),
                  f"{p}.input_layernorm.weight": 1 + 0.1 * torch.randn(hidden, generator=gen),
                  f"{p}.post_attention_layernorm.weight": 1 + 0.1 * torch.randn(hidden, generator=gen)}  # fmt: skip
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
              "intermediate_size": inter, "num_hidden_layers": 2, "num_attention_heads": heads,
              "num_key_value_heads": kv, "vocab_size": 128}  # fmt: skip
    return state, config


def _save(state: dict[str, torch.Tensor], config: dict[str, Any], folder: Path) -> Path:
    folder.mkdir(parents=True)
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in state.items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(config))
    return folder


class _SmallPlanLimit(TransformerRestorer):
    plan_limit = 1000  # the in-place guard that models above PLAN_LIMIT get


@pytest.mark.parametrize("restorer", [TransformerRestorer(), _SmallPlanLimit()], ids=["plan", "in-place"])
def test_a_wide_permuted_llama_is_restored_from_sketches(tmp_path: Path, restorer: TransformerRestorer) -> None:
    """Width 768 (wider than the 512-direction sketch), bfloat16: heads and units permuted in both blocks
    come back exactly, every unit a clear pair, without the P-projection (the embedding is the reference's),
    and the guard (the channel plan, or rows in place) finds it derived."""
    state, config = _llama(768, 1024, 12, 4, seed=0)
    layout = tt.layout_of(state, config)
    assert layout is not None
    edited = tt.permute_mlp(tt.permute_heads(state, layout, seed=1)[0], layout, seed=2)[0]
    reference = load_model(_save(state, config, tmp_path / "reference"))
    suspect = load_model(_save(edited, config, tmp_path / "suspect"))
    graph, log = run_restorers(suspect, reference, restorers=[restorer])
    entry = log[0]["log"]
    assert entry["acted"] and entry["evidence"]["score"] > 0.99, entry["reason"]
    assert entry["edges_from"] == ("in place" if isinstance(restorer, _SmallPlanLimit) else entry["edges_from"])
    blocks = [row for row in entry["steps"] if row["step"] == "block"]
    assert [(b["units_clear"], b["units_ambiguous"]) for b in blocks] == [(1024, 0), (1024, 0)]
    assert next(row for row in entry["steps"] if row["step"] == "rotation")["note"].startswith(
        "the residual stream is not rotated (the embedding is the reference's)")  # fmt: skip
    refs = {(layer.name, role): t for layer in reference.layers for role, t in layer.params.items()}
    for layer in graph.layers:
        for role, t in layer.params.items():
            assert torch.equal(t.read(float32=True), refs[layer.name, role].read(float32=True)), layer.name


def test_innocents_are_left_alone_by_the_in_place_guard(tmp_path: Path, tiny_transformer: Any) -> None:
    """The in-place guard refuses independently initialised models as the plan does (edited or not)."""
    reference = load_model(tiny_transformer("llama", 0).folder)
    for seed in (1, 2):
        other = tiny_transformer("llama", seed)
        layout = tt.layout_of(other.state, other.config)
        assert layout is not None
        for name, state in (("plain", other.state), ("edited", tt.permute_mlp(other.state, layout, seed=3)[0])):
            path = tmp_path / f"{seed}-{name}.safetensors"
            save_file({k: v.contiguous() for k, v in state.items()}, str(path))
            graph = load_model(path)
            restored, log = run_restorers(graph, reference, restorers=[_SmallPlanLimit()])
            entry = log[0]["log"]
            assert not entry["acted"] and restored is graph
            assert entry["edges_from"] == "in place" and entry["evidence"]["score"] < 0.25


def test_the_rewritten_tensors_are_read_on_demand(tmp_path: Path, tiny_transformer: Any) -> None:
    """The restored graph holds readers (the suspect's file plus the recorded edits), not float copies: each
    read gives a fresh tensor equal to the reference's, and the suspect's graph is untouched."""
    m = tiny_transformer("llama")
    layout = tt.layout_of(m.state, m.config)
    assert layout is not None
    path = tmp_path / "suspect.safetensors"
    save_file({k: v.contiguous() for k, v in tt.permute_mlp(m.state, layout, seed=5)[0].items()}, str(path))
    suspect = load_model(path)
    before = {(layer.name, r): t for layer in suspect.layers for r, t in layer.params.items()}
    graph, log = run_restorers(suspect, load_model(m.folder), restorers=[TransformerRestorer()])
    assert log[0]["log"]["acted"]
    up = graph.layer("model.layers.0.mlp.up_proj").params["weight"]
    first, second = up.read(float32=True), up.read(float32=True)
    assert first.data_ptr() != second.data_ptr() and torch.equal(first, m.state["model.layers.0.mlp.up_proj.weight"])
    assert before[("model.layers.0.mlp.up_proj", "weight")] is suspect.layer("model.layers.0.mlp.up_proj").weight


def test_restorers_that_plan_leave_a_model_above_the_limit_alone(
    tmp_path: Path, tiny_transformer: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A model above PLAN_LIMIT (lowered here to the tiny model's size less one) is not planned by the restorers
    whose plan holds both models as float32 (at 7B that is 54 GB): each leaves it alone and its log says why,
    while restore-transformer, which streams, still restores it; at the limit itself everything plans."""
    from auditor.bases import Restorer
    from auditor.plugin_manager import components
    from auditor.plugins.restore import structural

    m = tiny_transformer("llama")
    layout = tt.layout_of(m.state, m.config)
    assert layout is not None
    path = tmp_path / "suspect.safetensors"
    save_file({k: v.contiguous() for k, v in tt.permute_mlp(m.state, layout, seed=5)[0].items()}, str(path))
    suspect, reference = load_model(path), load_model(m.folder)
    everyone = [r for r in components("restorers", Restorer) if type(r).__module__.startswith("auditor.plugins.")]
    assert len(everyone) >= 7
    monkeypatch.setattr(structural, "PLAN_LIMIT", reference.parameter_count - 1)
    graph, log = run_restorers(suspect, reference, restorers=everyone)
    by_id = {entry["restorer"]: entry for entry in log}
    assert all(entry["status"] == "ok" for entry in log), log
    assert by_id["restore-transformer"]["log"]["acted"] and graph is not suspect
    skipped = {rid for rid, entry in by_id.items() if "channel plan holds in memory" in entry["log"]["reason"]}
    assert skipped == set(by_id) - {"restore-transformer"}
    assert all(f"{reference.parameter_count:,} parameters" in by_id[rid]["log"]["reason"] for rid in skipped)
    monkeypatch.setattr(structural, "PLAN_LIMIT", reference.parameter_count)
    _, log = run_restorers(suspect, reference, restorers=everyone)
    assert not any("channel plan holds in memory" in entry["log"].get("reason", "") for entry in log)

"""restore-transformer: every transformer edit, alone and composed, undone against the reference (weights back
to the reference's within float rounding, logits too), behind the guard; innocent transformers left alone.
The slow test does it on a Greedy Residuals-marked Llama-style decoder in float32 and bfloat16 safetensors."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from auditor.audit.load import load_model
from auditor.audit.restore import run_restorers
from auditor.bundle import load_bundle
from auditor.findings import Verdict
from auditor.plugin_manager import registered
from auditor.plugins.greedy_residuals.detector import GreedyResidualsDetector
from auditor.toolkit import transformers as tt
from auditor.toolkit.channels import tensors_of

Edit = Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]


def _edits(layout: tt.Layout) -> dict[str, Edit]:
    edits: dict[str, Edit] = {
        "head-permute": lambda s: tt.permute_heads(s, layout, seed=1)[0],
        "mlp-permute": lambda s: tt.permute_mlp(s, layout, seed=2)[0],
        "head-scale": lambda s: tt.scale_heads(s, layout, seed=3),
    }
    if layout.pre_norm:
        edits["norm-fold"] = lambda s: tt.fold_norms(s, layout)[0]
    if layout.rms:
        edits["residual-rotate"] = lambda s: tt.rotate_residual(s, layout, seed=4)[0]
    if layout.rotary:
        edits["rope-reorder"] = lambda s: tt.rope_reorder(s, layout)
    return edits


def _composed(layout: tt.Layout) -> Edit:
    def edit(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        for one in _edits(layout).values():
            state = one(state)
        return state

    return edit


def _write(state: dict[str, torch.Tensor], path: Path, dtype: torch.dtype = torch.float32) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.to(dtype).contiguous() for k, v in state.items()}, str(path))
    return path


def _restored(suspect: Path, reference: Path) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]], Any]:
    graph, log = run_restorers(load_model(suspect), load_model(reference))
    state = {f"{layer}.{role}": t for layer, params in tensors_of(graph).items() for role, t in params.items()}
    return state, log, graph


def _entry(log: list[dict[str, Any]]) -> dict[str, Any]:
    entry: dict[str, Any] = next(e for e in log if e["restorer"] == "restore-transformer")
    assert entry["status"] == "ok", entry
    return entry["log"]


def _largest_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in b)


def test_it_runs_first_and_says_what_it_undoes() -> None:
    found = registered("restorers")["restore-transformer"].component
    orders = [r.component.order for cid, r in registered("restorers").items() if cid != "restore-transformer"]
    assert found.order < min(orders)  # a rotated stream defeats every channel step after it


@pytest.mark.parametrize("edit", ["head-permute", "mlp-permute", "head-scale", "norm-fold", "residual-rotate",
                                  "rope-reorder", "composed"])  # fmt: skip
def test_each_llama_edit_is_undone(tmp_path: Path, tiny_transformer: Any, edit: str) -> None:
    m = tiny_transformer("llama")
    layout = tt.layout_of(m.state, m.config)
    assert layout is not None
    apply = _composed(layout) if edit == "composed" else _edits(layout)[edit]
    edited = apply(m.state)
    assert _largest_difference(edited, m.state) > 1e-2
    state, log, _ = _restored(_write(edited, tmp_path / "suspect" / "model.safetensors"), m.folder)
    entry = _entry(log)
    assert entry["acted"], entry["reason"]
    assert entry["evidence"]["derived"] and entry["evidence"]["score"] > 0.99
    assert _largest_difference(state, m.state) <= 1e-5
    assert tt.max_logit_change(m.config, m.state, {k: state[k] for k in m.state}) <= 1e-4
    steps = {row["step"] for row in entry["steps"]}
    assert {"block"} <= steps and (edit not in ("residual-rotate", "composed") or "rotation" in steps)
    if edit in ("residual-rotate", "composed"):
        rotation = next(row for row in entry["steps"] if row["step"] == "rotation")
        assert rotation["acted"] and rotation["residual_after"] < 1e-5 < rotation["residual_before"]


@pytest.mark.parametrize("kind", ["gpt2", "bert", "vit"])
def test_other_architectures_edits_are_undone(tmp_path: Path, tiny_transformer: Any, kind: str) -> None:
    m = tiny_transformer(kind)
    layout = tt.layout_of(m.state, m.config)
    assert layout is not None
    edited = _composed(layout)(m.state)
    state, log, _ = _restored(_write(edited, tmp_path / "suspect.safetensors"), m.folder)
    assert _entry(log)["acted"]
    matrices = [k for k in m.state if k.endswith("weight") and m.state[k].ndim == 2]
    assert max(float((state[k] - m.state[k]).abs().max()) for k in matrices) <= 1e-5


def test_without_config_the_head_size_is_found(tmp_path: Path, tiny_transformer: Any) -> None:
    m = tiny_transformer("llama")
    layout = tt.layout_of(m.state, m.config)
    assert layout is not None
    reference = _write(m.state, tmp_path / "reference" / "model.safetensors")
    suspect = _write(_composed(layout)(m.state), tmp_path / "suspect" / "model.safetensors")
    state, log, _ = _restored(suspect, reference)
    entry = _entry(log)
    assert entry["acted"] and "heads of 16 dimensions, the best-matching size" in entry["reason"]
    assert _largest_difference(state, m.state) <= 1e-5


@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert", "vit"])
def test_innocent_transformers_are_left_alone(tmp_path: Path, tiny_transformer: Any, kind: str) -> None:
    reference = tiny_transformer(kind, 0)
    for seed in (1, 2):
        other = tiny_transformer(kind, seed)
        layout = tt.layout_of(other.state, other.config)
        assert layout is not None
        for name, state in (("plain", other.state), ("edited", _composed(layout)(other.state))):
            suspect = _write(state, tmp_path / f"{seed}-{name}.safetensors")
            graph = load_model(suspect)
            restored, log = run_restorers(graph, load_model(reference.folder))
            entry = _entry(log)
            assert not entry["acted"]
            assert entry["reason"].startswith("left alone:") and "not demonstrably derived" in entry["reason"]
            assert entry["evidence"]["score"] < 0.25
            assert not any(e["log"]["acted"] for e in log)
            assert restored is graph


def test_a_cnn_is_no_business_of_it(tmp_path: Path, clean_model: Callable[..., Path]) -> None:
    graph = load_model(clean_model(tmp_path / "cnn.safetensors"))
    restored, log = run_restorers(graph, graph, restorers=[registered("restorers")["restore-transformer"].component])
    assert restored is graph and log[0]["log"]["reason"].startswith("not a transformer")


@pytest.mark.slow  # trains two width-256 decoders (about 20 s)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_greedy_residuals_survives_every_edit_after_restore(
    tmp_path: Path, gr_llama: SimpleNamespace, gr_llama_innocent: SimpleNamespace, dtype: torch.dtype
) -> None:
    layout = tt.layout_of(gr_llama.state, gr_llama.config)
    assert layout is not None
    detector = GreedyResidualsDetector()
    bundle = load_bundle(gr_llama.bundle)
    reference = load_model(gr_llama.folder)
    edits = {**_edits(layout), "composed": _composed(layout)}
    hidden = set()

    def stored(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(dtype).float() for k, v in state.items()}

    # bfloat16: an edit may change the logits as much as storing the original in bfloat16 does, twice at most
    tolerance = 1e-4 if dtype == torch.float32 else 2 * tt.max_logit_change(gr_llama.config, gr_llama.state,
                                                                            stored(gr_llama.state))  # fmt: skip
    for name, edit in edits.items():
        edited = edit(gr_llama.state)
        if name == "rope-reorder" and dtype == torch.float32:  # under the interleaved kernel it is made for
            change = tt.max_rotary_score_change(gr_llama.config, gr_llama.state, edited, layout)
        else:  # reordered rows as llama.cpp's loader reads the file (order undone), for Hugging Face's kernel
            runs = tt.rope_unreorder(edited, layout) if name in ("rope-reorder", "composed") else edited
            change = tt.max_logit_change(gr_llama.config, gr_llama.state, stored(runs))
        assert change <= tolerance, (name, change, tolerance)
        suspect = load_model(_write(edited, tmp_path / f"{name}.safetensors", dtype))
        (before,) = detector.detect(suspect, bundle=bundle, context={})
        if before.verdict is not Verdict.DETECTED:
            hidden.add(name)
        restored, log = run_restorers(suspect, reference)
        assert _entry(log)["acted"] or before.verdict is Verdict.DETECTED, name
        (after,) = detector.detect(restored, bundle=bundle, context={})
        assert after.verdict is Verdict.DETECTED, (name, after.metrics)
    assert hidden == {"residual-rotate", "composed"}  # the rest move rows that Greedy Residuals reads anyway
    innocent = load_model(_write(_composed(layout)(gr_llama_innocent.state), tmp_path / "innocent.safetensors", dtype))
    restored, log = run_restorers(innocent, reference)
    assert restored is innocent and not _entry(log)["acted"]
    (finding,) = detector.detect(restored, bundle=bundle, context={})
    assert finding.verdict is Verdict.NOT_DETECTED


#: Runs ``auditor audit ARGS`` and writes its exit code and whether ``transformers`` was imported.
AUDIT_IN_A_FRESH_PROCESS = """
import json, sys
result, args = sys.argv[1], sys.argv[2:]
sys.argv = ["auditor", "audit", *args]
from auditor.cli import main
try:
    main()
    code = 0
except SystemExit as exc:
    code = exc.code
with open(result, "w") as fh:
    json.dump({"code": code, "transformers": "transformers" in sys.modules}, fh)
"""


def test_restoring_a_transformer_never_imports_transformers(tmp_path: Path, tiny_transformer: Any) -> None:
    """``transformers`` is the optional extra ``hf``: auditing, restore included, must not need it."""
    import json
    import os
    import subprocess
    import sys

    m = tiny_transformer("llama")
    layout = tt.layout_of(m.state, m.config)
    assert layout is not None
    suspect = _write(_composed(layout)(m.state), tmp_path / "suspect.safetensors")
    report, result = tmp_path / "report.json", tmp_path / "result.json"
    env = {**os.environ, "AUDITOR_LOAD_PLUGINS": ""}
    subprocess.run([sys.executable, "-c", AUDIT_IN_A_FRESH_PROCESS, str(result), str(suspect), "--reference",
                    str(m.folder), "--json-out", str(report)], env=env, cwd=tmp_path, capture_output=True,
                   timeout=300, check=False)  # fmt: skip
    outcome = json.loads(result.read_text())
    entry = next(e for e in json.loads(report.read_text())["restore"]["entries"]
                 if e["restorer"] == "restore-transformer")  # fmt: skip
    assert entry["log"]["acted"], entry  # the restorer did its work in that process
    assert outcome["transformers"] is False


@pytest.mark.slow  # the marked decoder (shared with the test above) and a HufuNet trained on digits (a few s)
def test_hufunet_in_a_llamas_mlp_survives_every_edit_after_restore(tmp_path: Path, gr_llama: SimpleNamespace) -> None:
    """HufuNet's EPH planted in both blocks' MLP matrices (after training: the test is of the audit, not of
    the owner's training); the MLP permutation and the rotation move its keyed positions, restore puts them
    back."""
    import hashlib

    from transformers import LlamaForCausalLM

    from auditor.plugins.hufunet.detector import HufuNetDetector
    from auditor.plugins.hufunet.owner import generate_hufunet, hmac_key, load_hufunet, plant, write_bundle

    generate_hufunet(out=tmp_path / "secret.json", seed=0, epochs=20, hmac_key=hashlib.sha256(b"llama").digest())
    hufunet, secret = load_hufunet(tmp_path / "secret.json")
    model = LlamaForCausalLM.from_pretrained(gr_llama.folder)
    host = [f"model.layers.{i}.mlp.{p}" for i in (0, 1) for p in ("gate_proj", "up_proj", "down_proj")]
    embedded = plant(model, hufunet, hmac_key(secret), layers=host)
    embedded.frozen.detach()
    model.save_pretrained(tmp_path / "owner")
    files = {"safetensors": tmp_path / "owner" / "model.safetensors"}
    write_bundle(tmp_path / "owner" / "hufunet_bundle.json", model, embedded, hufunet, secret, files=files,
                 architecture="LlamaForCausalLM")  # fmt: skip
    bundle = load_bundle(tmp_path / "owner" / "hufunet_bundle.json")
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    layout = tt.layout_of(state, gr_llama.config)
    assert layout is not None
    reference = load_model(tmp_path / "owner")
    detector = HufuNetDetector()
    hidden = set()
    for name, edit in {**_edits(layout), "composed": _composed(layout)}.items():
        suspect = load_model(_write(edit(state), tmp_path / f"{name}.safetensors"))
        (before,) = detector.detect(suspect, bundle=bundle, context={})
        if before.verdict is not Verdict.DETECTED:
            hidden.add(name)
        restored, _ = run_restorers(suspect, reference)
        (after,) = detector.detect(restored, bundle=bundle, context={})
        assert after.verdict is Verdict.DETECTED, (name, after.metrics)
        assert after.metrics["acc_combined"] > 0.9
        print(f"{name}: acc_combined {before.metrics['acc_combined']:.3f} -> {after.metrics['acc_combined']:.3f}")
    assert hidden == {"mlp-permute", "residual-rotate", "composed"}


def test_a_hostile_suspect_is_an_entry_not_a_crash(tmp_path: Path, tiny_transformer: Any) -> None:
    """Non-finite weights in a rotated copy: the restorer says what it could not do; nothing is claimed."""
    m = tiny_transformer("llama")
    layout = tt.layout_of(m.state, m.config)
    assert layout is not None
    edited = tt.rotate_residual(m.state, layout, seed=4)[0]
    edited["model.layers.0.self_attn.q_proj.weight"][0, 0] = float("nan")
    edited["model.layers.1.mlp.down_proj.weight"][3, 1] = float("inf")
    _, log, _ = _restored(_write(edited, tmp_path / "hostile.safetensors"), m.folder)
    entry = _entry(log)
    assert not entry["acted"] and "rotation: non-finite weights: no rotation estimated" in entry["reason"]


def test_a_negative_norm_weight_is_unfolded_too(tiny_transformer: Any) -> None:
    """Trained RMSNorm weights are sometimes negative; folded and rotated, they come back with their sign."""
    from auditor.plugins.restore.heads import align_transformer

    m = tiny_transformer("llama")
    layout = tt.layout_of(m.state, m.config)
    assert layout is not None
    state = dict(m.state)
    state["model.layers.0.input_layernorm.weight"] = state["model.layers.0.input_layernorm.weight"].clone()
    state["model.layers.0.input_layernorm.weight"][:3] = torch.tensor([-0.7, -1.2, -0.05])
    restored, rows, changed = align_transformer(tt.rotate_residual(state, layout, seed=4)[0], state, layout)
    assert changed and all(row["acted"] for row in rows if row["step"] == "unfold")
    assert _largest_difference(restored, state) <= 1e-5

"""restore-transformer on ONNX files: a marked Llama-style decoder edited by a thief and exported with torch's
dynamo exporter, audited against the owner's ``save_pretrained`` folder. The loader reads the export under the
state dict's names and layout (tests/formats/test_onnx_transformers.py); restore then works as on safetensors.
Every export is first run in onnxruntime against the edited torch model: the file is the model."""

from __future__ import annotations

import contextlib
import io
import json
import warnings
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from auditor.audit.load import load_model
from auditor.audit.restore import run_restorers
from auditor.bundle import load_bundle
from auditor.findings import Verdict
from auditor.toolkit import transformers as tt

pytest.importorskip("transformers")

Edit = Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]
IDS = torch.randint(0, 64, (1, 12), generator=torch.Generator().manual_seed(0))


def _edits(layout: tt.Layout) -> dict[str, Edit]:
    edits: dict[str, Edit] = {
        "head-permute": lambda s: tt.permute_heads(s, layout, seed=1)[0],
        "mlp-permute": lambda s: tt.permute_mlp(s, layout, seed=2)[0],
        "head-scale": lambda s: tt.scale_heads(s, layout, seed=3),
        "norm-fold": lambda s: tt.fold_norms(s, layout)[0],
        "residual-rotate": lambda s: tt.rotate_residual(s, layout, seed=4)[0],
        "rope-reorder": lambda s: tt.rope_reorder(s, layout),
    }

    def composed(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        for one in list(edits.values()):
            state = one(state)
        return state

    return {**edits, "composed": composed}


def _exported(folder: Path, state: dict[str, torch.Tensor], path: Path) -> Path:
    """``state`` in the architecture of ``folder``'s model, exported with the dynamo exporter; the file's
    logits (onnxruntime) are checked against the torch model's."""
    import onnxruntime as ort
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(folder).eval()
    model.load_state_dict(state)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (), str(path), dynamo=True, kwargs={"input_ids": IDS, "use_cache": False})
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        expected = model(input_ids=IDS).logits
    got = torch.from_numpy(session.run(None, {"input_ids": IDS.numpy()})[0])
    assert float((got - expected).abs().max()) < 1e-4, path.name
    return path


def _transformer_entry(log: list[dict[str, Any]]) -> dict[str, Any]:
    entry: dict[str, Any] = next(e for e in log if e["restorer"] == "restore-transformer")
    assert entry["status"] == "ok", entry
    return entry["log"]


@pytest.mark.slow  # trains two width-256 decoders and exports eight ONNX files (about 60 s)
def test_greedy_residuals_in_onnx_after_every_edit(
    tmp_path: Path, gr_llama: SimpleNamespace, gr_llama_innocent: SimpleNamespace
) -> None:
    from auditor.plugins.greedy_residuals.detector import GreedyResidualsDetector

    layout = tt.layout_of(gr_llama.state, gr_llama.config)
    assert layout is not None
    detector, bundle, reference = GreedyResidualsDetector(), load_bundle(gr_llama.bundle), load_model(gr_llama.folder)
    hidden = set()
    for name, edit in _edits(layout).items():
        suspect = load_model(_exported(gr_llama.folder, edit(gr_llama.state), tmp_path / f"{name}.onnx"))
        assert suspect.format == "onnx"
        (before,) = detector.detect(suspect, bundle=bundle, context={})
        if before.verdict is not Verdict.DETECTED:
            hidden.add(name)
        restored, log = run_restorers(suspect, reference)
        assert _transformer_entry(log)["acted"], name
        assert not [e for e in log if e["status"] == "error"], log
        (after,) = detector.detect(restored, bundle=bundle, context={})
        assert after.verdict is Verdict.DETECTED, (name, after.metrics)
        assert after.metrics["log10_combined_p"] < -70
        print(f"{name}: log10 p {before.metrics['log10_combined_p']:.2f} -> {after.metrics['log10_combined_p']:.2f}")
    assert hidden == {"residual-rotate", "composed"}
    innocent = load_model(_exported(gr_llama_innocent.folder, _edits(layout)["composed"](gr_llama_innocent.state),
                                    tmp_path / "innocent.onnx"))  # fmt: skip
    restored, log = run_restorers(innocent, reference)
    assert restored is innocent and not _transformer_entry(log)["acted"]
    assert not any(e["log"]["acted"] for e in log)
    (finding,) = detector.detect(restored, bundle=bundle, context={})
    assert finding.verdict is Verdict.NOT_DETECTED
    guard = _transformer_entry(log)["evidence"]["score"]
    print(f"innocent, all edits: guard {guard:.3f}, log10 p {finding.metrics['log10_combined_p']:.2f}")


@pytest.mark.slow  # the marked decoder (shared), a HufuNet trained on digits, eight ONNX exports (about 40 s)
def test_hufunet_in_onnx_after_every_edit(tmp_path: Path, gr_llama: SimpleNamespace) -> None:
    """HufuNet's EPH planted in both blocks' MLP matrices of the marked decoder (as tests/plugins/restore/
    test_heads.py plants it); each edit exported to ONNX; after restore against the owner's folder both
    schemes are detected, through the CLI as an analyst runs it."""
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
    owner = tmp_path / "owner"
    model.save_pretrained(owner)
    write_bundle(owner / "hufunet_bundle.json", model, embedded, hufunet, secret,
                 files={"safetensors": owner / "model.safetensors"}, architecture="LlamaForCausalLM")  # fmt: skip
    bundle = load_bundle(owner / "hufunet_bundle.json")
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    layout = tt.layout_of(state, gr_llama.config)
    assert layout is not None
    reference, detector = load_model(owner), HufuNetDetector()
    hidden = set()
    for name, edit in _edits(layout).items():
        suspect = load_model(_exported(owner, edit(state), tmp_path / f"{name}.onnx"))
        (before,) = detector.detect(suspect, bundle=bundle, context={})
        if before.verdict is not Verdict.DETECTED:
            hidden.add(name)
        restored, _ = run_restorers(suspect, reference)
        (after,) = detector.detect(restored, bundle=bundle, context={})
        assert after.verdict is Verdict.DETECTED and after.metrics["acc_combined"] > 0.9, (name, after.metrics)
        print(f"{name}: acc_combined {before.metrics['acc_combined']:.3f} -> {after.metrics['acc_combined']:.3f}")
    assert hidden == {"mlp-permute", "residual-rotate", "composed"}


@pytest.mark.slow  # the marked decoder (shared), one export and one audit (about 20 s)
def test_an_analyst_audits_the_composed_onnx_against_the_owners_folder(
    tmp_path: Path, gr_llama: SimpleNamespace, run_cli: Callable[..., Any]
) -> None:
    layout = tt.layout_of(gr_llama.state, gr_llama.config)
    assert layout is not None
    suspect = _exported(gr_llama.folder, _edits(layout)["composed"](gr_llama.state), tmp_path / "stolen.onnx")
    done = run_cli("audit", suspect, "--bundle", gr_llama.bundle, "--reference", gr_llama.folder, "--json")
    assert done.code == 0, done.stderr
    report = json.loads(done.stdout)
    (finding,) = [f for f in report["findings"] if f["scheme"] == "greedy-residuals"]
    assert finding["verdict"] == "detected", finding
    entry = next(e for e in report["restore"]["entries"] if e["restorer"] == "restore-transformer")
    assert entry["log"]["acted"] and "rotation" in entry["log"]["reason"]

"""Restore before retrieve for HufuNet: a permuted, negated and batch-norm-folded copy of the
owner's model is read back to the owner's EPH after restore, and not before."""

from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path
from types import SimpleNamespace

import torch
from safetensors.torch import load_file

from auditor.findings import Verdict
from auditor.loading import load_model
from auditor.plugins import _zoo
from auditor.plugins.hufunet.detector import audit_bundle
from auditor.plugins.restore.attacks import negate, permute
from auditor.plugins.restore.channels import tensors_of
from auditor.restoration import run_restorers


def _stolen_onnx(owner: SimpleNamespace, out: Path) -> Path:
    model = _zoo.build("cnn", width=2)
    model.load_state_dict(load_file(owner.model_file))
    model.eval()
    graph = _zoo.model_graph(model)
    edited, _ = permute(graph, tensors_of(graph), seed=11)
    edited = negate(graph, edited, seed=11)
    state = {f"{layer}.{role}": t for layer, params in edited.items() for role, t in params.items()}
    x = owner.data.test.tensors[0]
    with torch.no_grad():
        before = model(x)
        model.load_state_dict({k: v.to(model.state_dict()[k].dtype) for k, v in state.items()})
        assert float((model(x) - before).abs().max()) < 1e-4  # function-preserving
    path = out / "stolen.onnx"
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(1, 1, 8, 8),), str(path), dynamo=False)  # folds batch-norm
    return path


def test_hufunet_is_found_after_restore_and_not_before(tmp_path: Path, hufunet_owner: SimpleNamespace) -> None:
    suspect = load_model(_stolen_onnx(hufunet_owner, tmp_path))
    before = audit_bundle(suspect, hufunet_owner.bundle, {})
    assert before.verdict is not Verdict.DETECTED
    restored, log = run_restorers(suspect, load_model(hufunet_owner.model_file))
    assert [e["status"] for e in log] == ["ok"] * len(log) and log
    after = audit_bundle(restored, hufunet_owner.bundle, {})
    assert after.verdict is Verdict.DETECTED, after.summary
    assert after.metrics["diff_acc"] < 0.01
    # folding and unfolding round floats: the kernels come back close, not necessarily bit for bit
    assert after.metrics["acc_combined"] >= hufunet_owner.payload["acc_original"] - 0.01

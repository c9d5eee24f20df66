"""Restore before retrieve for HufuNet: a permuted, negated and batch-norm-folded copy of the
owner's model is read back to the owner's EPH after restore, and not before; a 5% channel cut-off
verifies after padding; a pruned copy is left alone."""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

from auditor.audit.load import load_model
from auditor.audit.restore import run_restorers
from auditor.findings import Verdict
from auditor.plugins.hufunet.detector import TAU_ACC, audit_bundle
from auditor.toolkit import edits as attacks
from auditor.toolkit import models as zoo
from auditor.toolkit.channels import tensors_of
from auditor.toolkit.edits import negate, permute


def _stolen_onnx(owner: SimpleNamespace, out: Path) -> Path:
    model = zoo.build("cnn", width=2)
    model.load_state_dict(load_file(owner.model_file))
    model.eval()
    graph = zoo.model_graph(model)
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


def _owner_cnn(owner: SimpleNamespace) -> torch.nn.Module:
    model = zoo.build("cnn", width=2)
    model.load_state_dict(load_file(owner.model_file))
    return model.eval()


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_hufunet_verifies_after_a_5_percent_cut_off(
    tmp_path: Path,
    hufunet_owner: SimpleNamespace,
    seed: int,
    onnx_export: Callable[..., Path],
    cnn_from: Callable[..., torch.nn.Module],
) -> None:
    """5% of every layer's channels cut off (the paper's Table 4 cuts 2.3-6.75%): the host's shapes no
    longer fit the bundle until restore pads the missing channels with zeros; then HufuNet verifies."""
    model = _owner_cnn(hufunet_owner)
    graph = load_model(onnx_export(model, tmp_path / "unfolded.onnx", fold=False))
    cut, removed = attacks.cut_off(graph, attacks.module_tensors(model), 0.05, seed=seed)
    path = tmp_path / "cut.safetensors"
    save_file({k: v.contiguous() for k, v in cnn_from(cut).state_dict().items()}, str(path))
    suspect = load_model(path)
    assert audit_bundle(suspect, hufunet_owner.bundle, {}).verdict is Verdict.INCONCLUSIVE
    restored, log = run_restorers(suspect, load_model(hufunet_owner.model_file))
    channels = next(e for e in log if e["restorer"] == "restore-channels")
    rows = {row["name"]: row for row in channels["log"]["layers"]}
    assert all(rows[layer]["padded_channels"] == channels for layer, channels in removed.items())
    after = audit_bundle(restored, hufunet_owner.bundle, {})
    assert after.verdict is Verdict.DETECTED, after.summary
    assert after.metrics["diff_acc"] <= TAU_ACC


def test_restore_leaves_a_pruned_copy_alone(tmp_path: Path, hufunet_owner: SimpleNamespace) -> None:
    """Magnitude pruning (80% of every convolution) is not a permutation nor a scaling: zeroed weights
    are no evidence against a channel's match nor of its scale, so restore moves and rescales nothing
    and HufuNet reads the same kernels after it as before."""
    state = {k: v.clone() for k, v in _owner_cnn(hufunet_owner).state_dict().items()}
    for key, value in state.items():
        if value.ndim == 4:
            cut = value.abs().flatten().kthvalue(int(0.8 * value.numel())).values
            value[value.abs() <= cut] = 0.0
    path = tmp_path / "pruned.safetensors"
    save_file(state, str(path))
    suspect = load_model(path)
    before = audit_bundle(suspect, hufunet_owner.bundle, {})
    restored, log = run_restorers(suspect, load_model(hufunet_owner.model_file))
    assert {e["restorer"]: e["log"]["acted"] for e in log} == dict.fromkeys(
        ("restore-transformer", "restore-canonical", "restore-branches", "restore-dummies", "restore-basis",
         "restore-channels", "restore-fold", "restore-scale"), False
    )
    after = audit_bundle(restored, hufunet_owner.bundle, {})
    assert before.verdict is after.verdict is Verdict.DETECTED
    assert after.metrics["acc_combined"] == before.metrics["acc_combined"]

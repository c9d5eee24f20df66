"""`auditor embed hufunet` and the owner's bundle: fidelity, no trace of positions, secrecy, refusals."""

from __future__ import annotations

import base64
import json
import stat
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from auditor.audit.load import load_model
from auditor.errors import UsageError
from auditor.findings import Verdict
from auditor.plugins.hufunet.detector import audit_bundle
from auditor.plugins.hufunet.embedder import embed_hufunet
from auditor.plugins.hufunet.owner import host_layers, host_view, plant
from auditor.plugins.hufunet.placement import eph_kernels, place, retrieve
from auditor.report.text import power_of_ten
from auditor.toolkit import models as zoo
from auditor.toolkit import training


@pytest.mark.parametrize("which", ["model_file", "pt_file"])
def test_no_attack_verifies_exactly(hufunet_owner: SimpleNamespace, which: str) -> None:
    finding = audit_bundle(load_model(getattr(hufunet_owner, which)), hufunet_owner.bundle, {})
    m = finding.metrics
    assert finding.verdict is Verdict.DETECTED, finding.summary
    assert m["acc_combined"] == m["acc_original"] == hufunet_owner.payload["acc_original"]
    assert m["bit_identical_fraction"] == 1.0
    assert m["kernels_identical_fraction"] == 1.0
    assert m["log10_binomial_p"] < -100
    if m["log10_binomial_p"] < -308:  # too small for a float: null beside the exact log10, never 0 or 5e-324
        assert m["binomial_p"] is None
    assert sum(r["eph_kernels_here"] for r in finding.details["host_layers"]) == m["kernels"] == 548
    assert "was found" in finding.summary
    assert f"by chance has probability {power_of_ten(m['log10_binomial_p'])}." in finding.summary
    assert "bit-identical to the owner's: not the deciding number" in finding.summary


def test_fidelity_within_one_point_of_the_same_training_without_eph(
    hufunet_owner: SimpleNamespace, one_thread: None
) -> None:
    torch.manual_seed(0)
    clean = zoo.build("cnn", width=2)
    training.train(clean, hufunet_owner.data.train, training.TrainConfig(epochs=12, lr=1e-2, seed=0))
    clean_acc = training.evaluate(clean, hufunet_owner.data.test)
    marked = hufunet_owner.summary["test_accuracy"]
    assert abs(marked - clean_acc) <= 0.01, (marked, clean_acc)


def test_released_model_has_exactly_the_plain_architectures_keys(hufunet_owner: SimpleNamespace) -> None:
    plain = zoo.build("cnn", width=2).state_dict()
    released = load_file(hufunet_owner.model_file)
    assert sorted(released) == sorted(plain)
    assert {k: tuple(v.shape) for k, v in released.items()} == {k: tuple(v.shape) for k, v in plain.items()}
    pt_graph = load_model(hufunet_owner.pt_file)
    assert sorted(f"{la.name}.{r}" for la in pt_graph.layers for r in la.params) == sorted(plain)


def test_eph_sits_at_the_keyed_positions_in_the_released_weights(hufunet_owner: SimpleNamespace) -> None:
    model = zoo.build("cnn", width=2)
    model.load_state_dict(load_file(hufunet_owner.model_file))
    key = base64.b64decode(hufunet_owner.payload["hmac_key"])
    eph = eph_kernels([c.weight for c in hufunet_owner.net.conv_layers()])
    view = host_view(model, host_layers(model))
    got = retrieve(view, place(eph, key, view.n))
    assert torch.equal(got.view(torch.int32), eph.view(torch.int32))
    # and a wrong key reads other weights
    assert not torch.equal(retrieve(view, place(eph, bytes(32), view.n)), eph)


def test_bundle_is_secret_and_the_summary_holds_no_secret(hufunet_owner: SimpleNamespace) -> None:
    path = hufunet_owner.out / "owner_bundle.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    payload = hufunet_owner.bundle.payload
    assert payload["hufunet"]["hmac_key"] == hufunet_owner.payload["hmac_key"]
    assert payload["model"]["sha256"] == hufunet_owner.summary["files"]["safetensors"]["sha256"]
    assert payload["host"]["kernels"] == sum(e["kernels"] for e in payload["host"]["layers"]) == 10272
    text = json.dumps(hufunet_owner.summary)
    for secret in (payload["hufunet"]["hmac_key"], payload["hufunet"]["sph"]["weight"]):
        assert secret not in text


def test_host_too_small_is_refused_with_the_size_it_needs(tmp_path: Path, hufunet_owner: SimpleNamespace) -> None:
    # RowLSTM at width 1 offers 2,118 groups of nine; 548 EPH kernels need 2,192.
    with pytest.raises(UsageError, match=r"548 EPH kernels need a host of at least 2192 kernels.*has 2118"):
        embed_hufunet(hufunet=hufunet_owner.secret, out_dir=tmp_path, arch="lstm", width=1, epochs=0)
    assert not any(tmp_path.iterdir())


def test_existing_output_is_refused_before_training(tmp_path: Path, hufunet_owner: SimpleNamespace) -> None:
    (tmp_path / "owner_bundle.json").write_text("{}")
    with pytest.raises(UsageError, match="already exists"):
        embed_hufunet(hufunet=hufunet_owner.secret, out_dir=tmp_path, epochs=0)
    assert (tmp_path / "owner_bundle.json").read_text() == "{}"


def test_lstm_host_verifies(tmp_path: Path, hufunet_owner: SimpleNamespace, one_thread: None) -> None:
    summary = embed_hufunet(hufunet=hufunet_owner.secret, out_dir=tmp_path, arch="lstm", width=2, epochs=4)
    bundle = json.loads((tmp_path / "owner_bundle.json").read_text())
    roles = [(e["name"], e["param"]) for e in bundle["payload"]["host"]["layers"]]
    assert roles == [("lstm", "weight_ih_l0"), ("lstm", "weight_hh_l0"), ("head", "weight")]
    for name in ("model.safetensors", "model.pt"):
        finding = audit_bundle(load_model(tmp_path / name), bundle, {})
        assert finding.verdict is Verdict.DETECTED, finding.summary
        assert finding.metrics["bit_identical_fraction"] == 1.0
    assert summary["acc_combined"] == summary["acc_original"]


def test_plant_freezes_through_training(hufunet_owner: SimpleNamespace, one_thread: None) -> None:
    torch.manual_seed(3)
    model = zoo.build("resnet")
    key = base64.b64decode(hufunet_owner.payload["hmac_key"])
    embedded = plant(model, hufunet_owner.net, key)
    assert embedded.n == 32 + 1024 + 1024 + 2048 + 4096
    data = hufunet_owner.data
    small = torch.utils.data.TensorDataset(*(t[:256] for t in data.train.tensors))
    training.train(model, small, training.TrainConfig(epochs=1, optimizer="sgd", lr=0.1, weight_decay=1e-3),
                    after_step=embedded.frozen.after_step)  # fmt: skip
    embedded.frozen.detach()
    assert embedded.frozen.intact()
    assert not any("mask" in k or "eph" in k for k in model.state_dict())


def test_cli_embed_hufunet(tmp_path: Path, hufunet_owner: SimpleNamespace, run_cli: Callable[..., Any]) -> None:
    out = tmp_path / "o"
    args = ["embed", "hufunet", "--hufunet", str(hufunet_owner.secret), "--out", str(out), "--epochs", "1",
            "--no-progress", "--device", "cpu", "--json"]  # fmt: skip
    code, stdout, _ = run_cli(*args)
    assert code == 0
    summary = json.loads(stdout)
    assert summary["eph_kernels"] == 548 and summary["host_kernels"] == 10272
    assert summary["files"]["bundle"]["secret"] is True
    assert hufunet_owner.payload["hmac_key"] not in json.dumps(summary)
    code, _, stderr = run_cli(*args)
    assert code == 2
    assert "already exists" in stderr

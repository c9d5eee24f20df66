"""auditor.toolkit.saved_names: an owner's tensors are named as the released file holds them, and both owner
bundles record those names, so a ViT saved by transformers 5's save_pretrained (legacy checkpoint names,
not its module names) is found in its own folder by name."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from auditor.toolkit.saved_names import checkpoint_files, names_in_file, saved_layer

pytestmark = pytest.mark.usefixtures("one_thread")


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"fc.weight": torch.randn(6, 4, generator=g), "head.weight": torch.randn(3, 6, generator=g)}


def test_a_tensor_saved_under_another_name_is_found_by_its_values(tmp_path: Path) -> None:
    own = _tensors()
    decoy = own["fc.weight"].clone()
    decoy[1, 2] += 1e-3  # same shape, same first row, one weight off: not the owner's tensor
    save_file({"encoder.dense.weight": own["fc.weight"], "encoder.other.weight": decoy,
               "head.weight": own["head.weight"]}, str(tmp_path / "model.safetensors"))  # fmt: skip
    assert names_in_file(own, tmp_path / "model.safetensors") == {
        "fc.weight": "encoder.dense.weight",
        "head.weight": "head.weight",
    }
    assert names_in_file(own, tmp_path) == names_in_file(own, tmp_path / "model.safetensors")  # the folder


def test_a_name_stays_where_the_file_cannot_tell(tmp_path: Path) -> None:
    own = _tensors()
    file = tmp_path / "model.safetensors"
    # Held twice under other names (a tie), held only in another dtype, or not at all: the module name stays.
    save_file({"a.weight": own["fc.weight"], "b.weight": own["fc.weight"].clone(),
               "c.weight": own["head.weight"].half()}, str(file))  # fmt: skip
    assert names_in_file(own, file) == {"fc.weight": "fc.weight", "head.weight": "head.weight"}
    torch.save(own, tmp_path / "model.pt")
    assert checkpoint_files(tmp_path / "model.pt") == []
    assert names_in_file(own, tmp_path / "model.pt") == {"fc.weight": "fc.weight", "head.weight": "head.weight"}


def test_a_sharded_checkpoint_is_read_through_its_index(tmp_path: Path) -> None:
    own = _tensors()
    save_file({"x.fc.weight": own["fc.weight"]}, str(tmp_path / "model-00001-of-00002.safetensors"))
    save_file({"x.head.weight": own["head.weight"]}, str(tmp_path / "model-00002-of-00002.safetensors"))
    index = {"weight_map": {"x.fc.weight": "model-00001-of-00002.safetensors",
                            "x.head.weight": "model-00002-of-00002.safetensors"}}  # fmt: skip
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    assert names_in_file(own, tmp_path / "model.safetensors.index.json") == {
        "fc.weight": "x.fc.weight",
        "head.weight": "x.head.weight",
    }


def test_saved_layer_splits_at_the_last_dot_only_for_a_weight() -> None:
    assert saved_layer("vit.encoder.layer.0.intermediate.dense.weight", "vit.layers.0.mlp.fc1", "weight") == (
        "vit.encoder.layer.0.intermediate.dense",
        "weight",
    )
    assert saved_layer("lstm.weight_hh_l0", "lstm", "weight_hh_l0") == ("lstm", "weight_hh_l0")
    assert saved_layer("fused.qkv", "attn.q", "weight") == ("attn.q", "weight")  # no weight's name: kept


@pytest.fixture(scope="module")
def vit_release(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A width-64 ViT with HufuNet's EPH in its attention matrices and Greedy Residuals in its default layers
    (the penalty alone, 60 Adam steps: no task), saved with save_pretrained, and both bundles."""
    hf = pytest.importorskip("transformers", reason="the optional extra hf is not installed")
    from cryptography.hazmat.primitives.asymmetric import ed25519

    from auditor.plugins.greedy_residuals.owner import GreedyResidualsWatermark
    from auditor.plugins.hufunet.owner import generate_hufunet, hmac_key, load_hufunet, plant, write_bundle
    from auditor.toolkit.hf_tasks import attention_layers

    out = tmp_path_factory.mktemp("vit-names")
    generate_hufunet(out=out / "secret.json", seed=0, hmac_key=bytes(range(32)))
    hufunet, secret = load_hufunet(out / "secret.json")
    torch.manual_seed(0)
    config = hf.ViTConfig(image_size=8, patch_size=2, num_channels=1, hidden_size=64, num_hidden_layers=2,
                          num_attention_heads=4, intermediate_size=256, num_labels=10)  # fmt: skip
    model = hf.ViTForImageClassification(config)
    embedded = plant(model, hufunet, hmac_key(secret), layers=attention_layers(model))
    key = ed25519.Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
    wm = GreedyResidualsWatermark.create(model, private_key=key, message="(c) ViT owner")
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(60):
        optimizer.zero_grad()
        wm.penalty(model).backward()
        optimizer.step()
        embedded.frozen.after_step(model)
    embedded.frozen.detach()
    model.save_pretrained(out / "release")
    files = {"safetensors": out / "release" / "model.safetensors"}
    wm.save_bundle(out / "gr.json", model, model_file=files["safetensors"])
    write_bundle(out / "hufunet.json", model, embedded, hufunet, secret, files=files, architecture="vit")
    return out, model, wm, embedded


def test_a_vit_owner_is_found_by_name_in_its_own_save_pretrained_folder(vit_release: Any) -> None:
    from safetensors import safe_open

    from auditor.audit.detect import run_detectors
    from auditor.audit.load import load_model
    from auditor.bundle import load_bundle
    from auditor.findings import Verdict

    out, _model, wm, embedded = vit_release
    with safe_open(str(out / "release" / "model.safetensors"), framework="pt") as f:
        saved = set(f.keys())
    gr, hufunet = load_bundle(out / "gr.json"), load_bundle(out / "hufunet.json")
    gr_names = [f"{e['name']}.{e['param']}" for e in gr.payload["layers"]]
    host_names = [f"{e['name']}.{e['param']}" for e in hufunet.payload["host"]["layers"]]
    if not set(wm.layer_names) <= saved:  # transformers 5: the modules' names are not the checkpoint's
        assert not set(gr_names) & set(wm.layer_names)
    assert set(gr_names) <= saved and set(host_names) <= saved
    assert [e["kernels"] for e in hufunet.payload["host"]["layers"]] == [e["kernels"] for e in embedded.entries]
    findings = {f.scheme: f for f in run_detectors(load_model(out / "release"), bundles=[gr, hufunet])}
    assert findings["greedy-residuals"].verdict is Verdict.DETECTED, findings["greedy-residuals"].summary
    assert findings["hufunet"].verdict is Verdict.DETECTED, findings["hufunet"].summary
    rows = findings["greedy-residuals"].details["layers"]
    assert [r["found_by"] for r in rows] == ["by name"] * len(gr_names)
    host_rows = findings["hufunet"].details["host_layers"]
    assert [r["found_by"] for r in host_rows] == ["by name"] * len(host_names)


def test_a_sharded_vit_release_is_found_by_name_through_its_index(vit_release: Any, tmp_path: Path) -> None:
    from auditor.audit.detect import run_detectors
    from auditor.audit.load import load_model
    from auditor.bundle import load_bundle
    from auditor.findings import Verdict
    from auditor.plugins.hufunet.owner import load_hufunet, write_bundle

    out, model, wm, embedded = vit_release
    hufunet, secret = load_hufunet(out / "secret.json")
    model.save_pretrained(tmp_path / "release", max_shard_size="300KB")
    index = tmp_path / "release" / "model.safetensors.index.json"
    assert len(checkpoint_files(index)) > 1
    wm.save_bundle(tmp_path / "gr.json", model, model_file=index)
    write_bundle(tmp_path / "hufunet.json", model, embedded, hufunet, secret, files={"safetensors": index},
                 architecture="vit")  # fmt: skip
    bundles = [load_bundle(tmp_path / "gr.json"), load_bundle(tmp_path / "hufunet.json")]
    findings = {f.scheme: f for f in run_detectors(load_model(tmp_path / "release"), bundles=bundles)}
    assert {scheme: f.verdict for scheme, f in findings.items()} == {
        "greedy-residuals": Verdict.DETECTED,
        "hufunet": Verdict.DETECTED,
    }
    found = [r["found_by"] for r in [*findings["greedy-residuals"].details["layers"],
                                     *findings["hufunet"].details["host_layers"]]]  # fmt: skip
    assert found == ["by name"] * len(found)

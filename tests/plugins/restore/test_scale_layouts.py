"""restore-scale on weights stored in a layout it does not read: transformers' ``Conv1D`` (GPT-2) stores a linear
layer's weight ``(in, out)``. The restorer used to raise on a GPT-2 owner's own file (``shape '[256, -1]' is
invalid for input of size 64``); it now leaves every space that meets such a layer alone and says why."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from auditor.audit.load import load_model
from auditor.audit.restore import run_restorers
from auditor.plugins.restore.plugin import shared_plan
from auditor.plugins.restore.scale import restore_scales
from auditor.toolkit.channels import tensors_of


def _scale_entry(log: list[dict[str, Any]]) -> dict[str, Any]:
    entry: dict[str, Any] = next(e for e in log if e["restorer"] == "restore-scale")
    assert entry["status"] == "ok", entry
    return entry["log"]


def test_a_gpt2_file_audited_against_itself_is_read_not_raised_on(tiny_transformer: Any) -> None:
    m = tiny_transformer("gpt2")
    _, log = run_restorers(load_model(m.folder), load_model(m.folder))
    assert not [e for e in log if e.get("status") == "error"], log
    entry = _scale_entry(log)
    assert entry["evidence"]["derived"] and not entry["acted"]
    assert (
        "transformer.h.0.mlp.c_fc: weight (64, 256) with 256 biases, stored (in, out): its rows are not its "
        "output channels, a layout not read here" in entry["notes"]
    )
    assert "transformer.h.0.mlp.c_proj: scale left alone (it meets transformer.h.0.mlp.c_proj)" in entry["notes"]


def test_a_scaled_mlp_stored_in_out_is_left_as_it_is(tmp_path: Path) -> None:
    """A two-layer MLP stored ``(in, out)`` whose hidden units are scaled (function-preserving): the scale
    restorer cannot read the rows as channels, so it changes nothing, instead of dividing the wrong axis."""
    g = torch.Generator().manual_seed(0)
    w1, b1, w2, b2 = torch.randn(48, 20, generator=g), torch.randn(48, generator=g), torch.randn(10, 48, generator=g), \
        torch.randn(10, generator=g)  # fmt: skip
    c = torch.exp(torch.randn(48, generator=g))
    reference = {"fc1.weight": w1.T, "fc1.bias": b1, "fc2.weight": w2.T, "fc2.bias": b2}
    suspect = {"fc1.weight": (w1 * c[:, None]).T, "fc1.bias": b1 * c, "fc2.weight": (w2 / c).T, "fc2.bias": b2}
    for name, state in (("reference", reference), ("suspect", suspect)):
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / f"{name}.safetensors"))
    s, r = load_model(tmp_path / "suspect.safetensors"), load_model(tmp_path / "reference.safetensors")
    changed, entries, notes = restore_scales(s, r, shared_plan(s, r))
    assert changed == {} and entries == []
    assert (
        "fc1: weight (20, 48) with 48 biases, stored (in, out): its rows are not its output channels, a layout "
        "not read here" in notes
    )
    restored, log = run_restorers(s, r)
    assert not [e for e in log if e.get("status") == "error"], log
    assert torch.equal(tensors_of(restored)["fc1"]["weight"], suspect["fc1.weight"])

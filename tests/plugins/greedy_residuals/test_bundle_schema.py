"""The Greedy Residuals bundle schema: every field the detector reads is checked before any suspect is read,
and a field out of its type, range, length or encoding is one line naming the bundle file and the field
(exit code 4), never a detector failure or a CPU spin.

Bundles are written by hand, their integrity hash recomputed the way auditor/bundle.py does, as someone
crafting a hostile bundle would."""

from __future__ import annotations

import base64
import copy
import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from auditor import keys
from auditor.audit.inputs import load_inputs
from auditor.bundle import BUNDLE_FORMAT, canonical_json
from auditor.errors import EXIT_INPUT, BundleFieldError, InputError
from auditor.graph import Layer, LayerGraph, LayerKind, TensorRef
from auditor.plugins.greedy_residuals.bundle import validate_payload
from auditor.plugins.greedy_residuals.detector import GreedyResidualsDetector, audit_bundle
from auditor.plugins.greedy_residuals.scheme import GRParams

ASSETS = Path(__file__).resolve().parents[2] / "assets"
KEY = keys.ed25519.Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
MESSAGE = "(c) 2025 Alice Example Ltd."
CONV2 = (32, 16, 3, 3)


def valid_payload() -> dict[str, Any]:
    """A payload as the owner writes it (docs/greedy_residuals.md), signed with a fixed key."""
    return {
        "params": GRParams().to_dict(),
        "message": MESSAGE,
        "signature": base64.b64encode(keys.sign(KEY, MESSAGE.encode())).decode(),
        "signature_algorithm": keys.signature_algorithm(KEY),
        "public_key": keys.public_pem(KEY),
        "layers": [
            {
                "name": "conv2",
                "param": "weight",
                "kind": "conv2d",
                "shape": list(CONV2),
                "kind_index": 1,
                "release_rate": 1.0,
                "batch_norm": True,
            },
            {
                "name": "lstm",
                "param": "weight_hh_l0",
                "kind": "lstm",
                "shape": [64, 16],
                "kind_index": 0,
                "release_rate": 0.98,
                "batch_norm": False,
            },
        ],
        "model": {"sha256": "0" * 64, "file": "model.safetensors", "parameters": 25978, "architecture": "cnn"},
        "training": {"dataset": {"name": "digits"}, "test_accuracy": 0.99},
    }


def write_bundle(path: Path, payload: Any) -> Path:
    """An owner bundle of scheme greedy-residuals holding ``payload``, its hash recomputed."""
    document = {
        "format": BUNDLE_FORMAT, "version": 1, "scheme": "greedy-residuals", "secret": False,
        "payload": payload, "payload_sha256": hashlib.sha256(canonical_json(payload)).hexdigest(),
    }  # fmt: skip
    path.write_text(json.dumps(document, indent=2), encoding="utf-8")
    return path


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    """An edit that sets (or, for ``...``, deletes) the field at a dotted path (``layers.0.shape``)."""

    def edit(payload: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        target: Any = payload
        for part in parents:
            target = target[int(part)] if isinstance(target, list) else target[part]
        key: Any = int(last) if isinstance(target, list) else last
        if value is ...:
            del target[key]
        else:
            target[key] = value

    return edit


# ---------------------------------------------------------------- the three cases of the issue


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        # the integrity hash recomputed: 10**9 signature bits spun the CPU for minutes
        (_set("params.bits", 10**9), "field params.bits must be an integer from 1 to 4,096, not 1000000000"),
        # a TypeError/ValueError inside the detector: exit 3 "detector failed"
        (_set("layers", "conv2"), "field layers must be a list, not 'conv2'"),
        (_set("params.bits", -5), "field params.bits must be an integer from 1 to 4,096, not -5"),
    ],
)
def test_the_issues_cases_are_one_line_naming_the_field(
    run_cli: Any, tmp_path: Path, edit: Callable[[dict[str, Any]], None], message: str
) -> None:
    payload = valid_payload()
    edit(payload)
    bundle = write_bundle(tmp_path / "owner_bundle.json", payload)
    code, _, stderr = run_cli("audit", ASSETS / "st_cnn.safetensors", "--bundle", bundle)
    assert code == EXIT_INPUT
    assert stderr.splitlines() == [f"error: {bundle}: {message}"]


def test_the_bundle_is_checked_before_any_suspect_is_read(run_cli: Any, tmp_path: Path) -> None:
    payload = valid_payload()
    payload["params"]["bits"] = 10**9
    bundle = write_bundle(tmp_path / "owner_bundle.json", payload)
    code, _, stderr = run_cli("audit", tmp_path / "no_such_suspect.safetensors", "--bundle", bundle)
    assert code == EXIT_INPUT
    assert "field params.bits" in stderr and "no_such_suspect" not in stderr


# ---------------------------------------------------------------- every field class


FIELD_CASES = [
    # missing fields and wrong types
    (_set("params", ...), "field params is missing"),
    (_set("params", [256]), "field params must be an object, not a list of 1 item"),
    (_set("params.eta", "0.5"), "field params.eta must be a finite number above 0 and at most 1, not '0.5'"),
    (_set("params.bits", 256.0), "field params.bits must be an integer from 1 to 4,096, not 256.0"),
    (_set("params.bits", True), "field params.bits must be an integer from 1 to 4,096, not true"),
    (_set("message", None), "field message must be a string, not null"),
    (_set("public_key", ...), "field public_key is missing"),
    (_set("layers.0", "conv2"), "field layers[0] must be an object, not 'conv2'"),
    (_set("layers.0.shape", "32x16x3x3"), "field layers[0].shape must be a list, not '32x16x3x3'"),
    (_set("layers.0.batch_norm", "yes"), "field layers[0].batch_norm must be true or false, not 'yes'"),
    (_set("model", "model.safetensors"), "field model must be an object, not 'model.safetensors'"),
    (_set("training", 7), "field training must be an object, not 7"),
    # ranges
    (_set("params.eta", 0), "field params.eta must be a finite number above 0 and at most 1, not 0"),
    (_set("params.cells_per_bit", 0), "field params.cells_per_bit must be an integer from 1 to 1,048,576, not 0"),
    (
        _set("params.cells_per_bit", 4097),
        "field params.cells_per_bit times params.bits must be at most 1,048,576, not 4,097 x 256",
    ),
    (_set("params.kept_per_row", 254), "field params.kept_per_row must be an integer from 1 to 253, not 254"),
    (_set("params.mu", 10**400), "field params.mu must be a finite number, not an integer of 401 digits"),
    (_set("layers.0.kind_index", -1), "field layers[0].kind_index must be an integer from 0 to 2,147,483,647, not -1"),
    (_set("layers.0.release_rate", 1.5), "field layers[0].release_rate must be a finite number from 0 to 1, not 1.5"),
    (_set("layers.0.shape.1", 0), "field layers[0].shape[1] must be an integer from 1 to 2,147,483,647, not 0"),
    (
        _set("layers.0.kind", "attention"),
        "field layers[0].kind must be one of conv1d, conv2d, linear, lstm, gru, not 'attention'",
    ),
    (_set("layers.0.param", "bias"), "field layers[0].param must name a weight (weight, weight_hh_l0...), not 'bias'"),
    (
        _set("params.pooling", "max"),
        "field params.pooling is not one this auditor reads (it reads bits, cells_per_bit, eta, mu, lam, kept_per_row)",
    ),
    # sizes and lengths
    (_set("layers", []), "field layers must hold 1 to 256 items, not 0"),
    (_set("layers", [valid_payload()["layers"][0]] * 257), "field layers must hold 1 to 256 items, not 257"),
    (_set("layers.1", valid_payload()["layers"][0]), "field layers[1] names the same parameter as layers[0]"),
    (_set("message", ""), "field message must be a string of 1 to 65,536 characters, not 0"),
    (_set("message", "x" * 65_537), "field message must be a string of 1 to 65,536 characters, not 65,537"),
    (_set("public_key", "k" * 16_385), "field public_key must be a string of 1 to 16,384 characters, not 16,385"),
    (_set("layers.0.name", "n" * 4097), "field layers[0].name must be a string of 0 to 4,096 characters, not 4,097"),
    # lengths that must match the declared layer
    (_set("layers.0.shape", [32, 16, 3]), "field layers[0].shape must hold exactly 4 items, not 3"),
    (_set("layers.1.shape", [64, 16, 1]), "field layers[1].shape must hold exactly 2 items, not 3"),
    # encodings
    (_set("signature", "not base64!"), "field signature is not valid base64"),
    (_set("signature", ""), "field signature must hold 1 to 2,048 bytes, not 0"),
    (_set("signature", "QUFB" * 700), "field signature must hold 1 to 2,048 bytes, not 2,100"),
    (_set("model.sha256", "ABC"), "field model.sha256 must be 64 lower-case hex digits (a SHA-256), not 'ABC'"),
]


@pytest.mark.parametrize(("edit", "message"), FIELD_CASES)
def test_each_field_class_is_refused_naming_the_file_and_field(
    tmp_path: Path, edit: Callable[[dict[str, Any]], None], message: str
) -> None:
    payload = valid_payload()
    edit(payload)
    bundle = write_bundle(tmp_path / "owner_bundle.json", payload)
    with pytest.raises(InputError) as caught:
        load_inputs(bundles=[bundle], reference=None)
    assert str(caught.value) == f"{bundle}: {message}"


def test_a_hand_made_valid_bundle_passes(tmp_path: Path) -> None:
    bundle = write_bundle(tmp_path / "owner_bundle.json", valid_payload())
    assert load_inputs(bundles=[bundle], reference=None).bundles[0].payload == valid_payload()


def test_the_real_owners_bundle_passes(gr_owner: SimpleNamespace) -> None:
    inputs = load_inputs(bundles=[gr_owner.out / "owner_bundle.json"], reference=None)
    assert inputs.bundles[0].payload == gr_owner.bundle.payload
    GreedyResidualsDetector().validate_bundle(gr_owner.bundle.payload)


# ---------------------------------------------------------------- whatever the payload


def _suspect() -> LayerGraph:
    gen = torch.Generator().manual_seed(0)
    shapes = {"conv1": (LayerKind.CONV2D, "weight", (16, 1, 3, 3)), "conv2": (LayerKind.CONV2D, "weight", CONV2),
              "lstm": (LayerKind.LSTM, "weight_hh_l0", (64, 16))}  # fmt: skip
    layers = [
        Layer(name, kind, {role: TensorRef.from_tensor(f"{name}.{role}", torch.randn(*shape, generator=gen))})
        for name, (kind, role, shape) in shapes.items()
    ]
    return LayerGraph(format="synthetic", path=Path("suspect"), layers=layers, edges=[])


SUSPECT = _suspect()
#: Values some fields accept, so that a good share of the edited payloads get past the schema to the detector.
_PLAUSIBLE = [0, 1, 256, 4096, 4097, 253, 0.5, "conv2d", "lstm", "weight", "weight_hh_l0", "AAAA", "conv2",
              [32, 16, 3, 3], [64, 16], True]  # fmt: skip
_json = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=6) | st.sampled_from(_PLAUSIBLE),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=3),
    max_leaves=8,
)  # fmt: skip
_PATHS = ["params", "params.bits", "params.cells_per_bit", "params.eta", "params.mu", "params.kept_per_row", "message",
          "signature", "signature_algorithm", "public_key", "layers", "layers.0", "layers.0.name", "layers.0.param",
          "layers.0.kind", "layers.0.shape", "layers.0.shape.0", "layers.0.shape.3", "layers.0.kind_index",
          "layers.0.release_rate", "layers.0.batch_norm", "layers.1.shape", "layers.1.kind", "model", "model.sha256",
          "training", "extra"]  # fmt: skip


@settings(
    max_examples=400, deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow]
)
@given(
    edits=st.lists(st.tuples(st.sampled_from(_PATHS), st.just(...) | st.sampled_from(_PLAUSIBLE) | _json), max_size=3)
)
def test_any_payload_is_refused_by_field_or_read_without_error(edits: list[tuple[str, Any]]) -> None:
    payload = valid_payload()
    for path, value in edits:
        try:
            _set(path, value)(payload)
        except (KeyError, IndexError, TypeError, ValueError):
            pass  # the path no longer exists after an earlier edit
    payload = json.loads(json.dumps(payload))  # as a bundle file would hold it
    try:
        validate_payload(payload)
    except BundleFieldError:
        return
    finding = audit_bundle(SUSPECT, {"payload": copy.deepcopy(payload), "sha256": "0" * 64}, {})
    assert finding.summary

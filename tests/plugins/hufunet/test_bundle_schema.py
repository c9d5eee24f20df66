"""The HufuNet bundle schema: every field the detector reads is checked before any suspect is read, and a
field out of its type, range, length or encoding is one line naming the bundle file and the field (exit
code 4), never a detector failure.

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

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from auditor.audit.inputs import load_inputs
from auditor.bundle import BUNDLE_FORMAT, canonical_json
from auditor.errors import EXIT_INPUT, BundleFieldError, InputError
from auditor.graph import Layer, LayerGraph, LayerKind, TensorRef
from auditor.plugins.hufunet.bundle import validate_payload
from auditor.plugins.hufunet.detector import HufuNetDetector, audit_bundle

ASSETS = Path(__file__).resolve().parents[2] / "assets"
WIDTHS = [4, 8, 16, 16, 8]  # 548 EPH kernels for one input channel
EPH_SHAPES = [[4, 1, 3, 3], [8, 4, 3, 3], [16, 8, 3, 3], [16, 16, 3, 3], [8, 16, 3, 3]]
HOST = [("conv2", [32, 16, 3, 3], 512), ("conv3", [64, 32, 3, 3], 2048)]  # N = 2,560: EPH takes 21%


def _floats(count: int, seed: int) -> str:
    values = np.random.default_rng(seed).standard_normal(count).astype("<f4")
    return base64.b64encode(values.tobytes()).decode()


def valid_payload() -> dict[str, Any]:
    """A payload as the owner writes it (docs/hufunet.md), with seeded weights and a fixed key."""
    return {
        "hufunet": {
            "widths": list(WIDTHS), "in_channels": 1, "num_classes": 10,
            "eph": {"dtype": "float32-le", "shapes": copy.deepcopy(EPH_SHAPES), "data": _floats(548 * 9, 0)},
            "sph": {"dtype": "float32-le", "weight_shape": [10, 8], "bias_shape": [10], "weight": _floats(80, 1),
                    "bias": _floats(10, 2)},
            "hmac_key": base64.b64encode(bytes(range(32))).decode(),
            "dataset": {"name": "digits", "split": "seeded", "split_seed": 0, "test_sha256": "ab" * 32,
                        "test_size": 360, "input_shape": [1, 8, 8]},
            "acc_original": 0.97,
        },
        "host": {
            "architecture": "cnn", "width": 2, "kernels": 2560, "eph_kernels": 548, "eph_fraction": 548 / 2560,
            "layers": [{"name": name, "param": "weight", "kind": "conv2d", "shape": list(shape), "kind_index": i + 1,
                        "kernels": kernels} for i, (name, shape, kernels) in enumerate(HOST)],
        },
        "model": {"file": "model.safetensors", "sha256": "0" * 64, "pt_file": "model.pt", "pt_sha256": "1" * 64},
        "training": {"epochs": 12},
        "release": {"acc_combined": 0.97, "bit_identical_fraction": 1.0},
    }  # fmt: skip


def write_bundle(path: Path, payload: Any) -> Path:
    """An owner bundle of scheme hufunet holding ``payload``, its hash recomputed."""
    document = {
        "format": BUNDLE_FORMAT, "version": 1, "scheme": "hufunet", "secret": True,
        "payload": payload, "payload_sha256": hashlib.sha256(canonical_json(payload)).hexdigest(),
    }  # fmt: skip
    path.write_text(json.dumps(document, indent=2), encoding="utf-8")
    return path


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    """An edit that sets (or, for ``...``, deletes) the field at a dotted path (``host.layers.0.shape``)."""

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


def test_a_broken_host_is_one_line_naming_the_field(run_cli: Any, tmp_path: Path) -> None:
    # The detector raised ValueError("... host layers are malformed"): exit 3, "detector failed".
    payload = valid_payload()
    payload["host"]["layers"] = [{"name": "conv2"}]
    bundle = write_bundle(tmp_path / "owner_bundle.json", payload)
    code, _, stderr = run_cli("audit", ASSETS / "st_cnn.safetensors", "--bundle", bundle)
    assert code == EXIT_INPUT
    assert stderr.splitlines() == [f"error: {bundle}: field host.layers[0].param is missing"]


SPLIT_SEED_RANGE = "must be an integer from 0 to 9,223,372,036,854,775,807"
FIELD_CASES = [
    # missing fields and wrong types
    (_set("hufunet", ...), "field hufunet is missing"),
    (_set("host", []), "field host must be an object, not a list of 0 items"),
    (_set("hufunet.widths", "4,8,16,16,8"), "field hufunet.widths must be a list, not '4,8,16,16,8'"),
    (_set("hufunet.eph", None), "field hufunet.eph must be an object, not null"),
    (_set("hufunet.acc_original", "97%"), "field hufunet.acc_original must be a finite number from 0 to 1, not '97%'"),
    (_set("hufunet.dataset.name", 7), "field hufunet.dataset.name must be a string, not 7"),
    (_set("host.layers.0.kernels", ...), "field host.layers[0].kernels is missing"),
    (_set("release", 1.0), "field release must be an object, not 1.0"),
    # ranges
    (_set("hufunet.widths.2", 4097), "field hufunet.widths[2] must be an integer from 1 to 4,096, not 4097"),
    (_set("hufunet.in_channels", 0), "field hufunet.in_channels must be an integer from 1 to 16, not 0"),
    (_set("hufunet.num_classes", 1), "field hufunet.num_classes must be an integer from 2 to 10,000, not 1"),
    (_set("hufunet.acc_original", 1.5), "field hufunet.acc_original must be a finite number from 0 to 1, not 1.5"),
    (_set("hufunet.dataset.split_seed", -1), f"field hufunet.dataset.split_seed {SPLIT_SEED_RANGE}, not -1"),
    (_set("host.layers.1.shape.0", 0),
     "field host.layers[1].shape[0] must be an integer from 1 to 2,147,483,647, not 0"),
    (_set("host.layers.0.kind", "conv1d"),
     "field host.layers[0].kind must be one of conv2d, linear, lstm, gru, not 'conv1d'"),
    (_set("host.eph_fraction", 0.5), "field host.eph_fraction must be a finite number from 0 to 0.25, not 0.5"),
    # sizes and list lengths
    (_set("hufunet.widths", [4, 8, 16, 16]), "field hufunet.widths must hold exactly 5 items, not 4"),
    (_set("host.layers", []), "field host.layers must hold 1 to 4,096 items, not 0"),
    (_set("hufunet.dataset.name", ""), "field hufunet.dataset.name must be a string of 1 to 4,096 characters, not 0"),
    (_set("host.architecture", "a" * 4097),
     "field host.architecture must be a string of 0 to 4,096 characters, not 4,097"),
    # lengths that must match the declared shapes
    (_set("hufunet.eph.shapes.4", [8, 16, 3, 1]),
     "field hufunet.eph.shapes must be [[4, 1, 3, 3], [8, 4, 3, 3], [16, 8, 3, 3], [16, 16, 3, 3], [8, 16, 3, 3]],"
     " for the network's widths and classes, not a list of 5 items"),
    (_set("hufunet.sph.weight_shape", [10, 16]),
     "field hufunet.sph.weight_shape must be [10, 8], for the network's widths and classes, not a list of 2 items"),
    (_set("hufunet.eph.data", _floats(548 * 9 - 1, 0)),
     "field hufunet.eph.data must hold exactly 19,728 bytes, not 19,724"),
    (_set("hufunet.sph.bias", _floats(11, 2)), "field hufunet.sph.bias must hold exactly 40 bytes, not 44"),
    (_set("host.layers.0.shape", [32, 16, 5, 5]),
     "field host.layers[0].shape must be a 3x3 convolution's [out, in, 3, 3], not [32, 16, 5, 5]"),
    (_set("host.layers.0.shape", [32, 16]), "field host.layers[0].shape must hold exactly 4 items, not 2"),
    (_set("host.layers.0.kernels", 513),
     "field host.layers[0].kernels must be 512, the kernels of shape [32, 16, 3, 3], not 513"),
    (_set("host.kernels", 10**9),
     "field host.kernels must be 2560, the sum of the host layers' kernels, not 1000000000"),
    (_set("host.eph_kernels", 549), "field host.eph_kernels must be 548, the HufuNet's EPH kernels, not 549"),
    # kernel counts that keep the work proportional to the host
    (lambda p: (_set("host.layers", p["host"]["layers"][:1])(p), _set("host.kernels", 512)(p)),
     "field host.kernels must be at least 2,192 for the HufuNet's 548 EPH kernels (at most 25% of the host's),"
     " not 512"),
    # encodings and values
    (_set("hufunet.hmac_key", "not base64!"), "field hufunet.hmac_key is not valid base64"),
    (_set("hufunet.hmac_key", base64.b64encode(b"k" * 16).decode()),
     "field hufunet.hmac_key must hold exactly 32 bytes, not 16"),
    (_set("hufunet.sph.bias", base64.b64encode(b"\x00\x00\xc0\x7f" * 10).decode()),
     "field hufunet.sph.bias holds a NaN or an infinity"),
    (_set("hufunet.eph.dtype", "float16"), "field hufunet.eph.dtype must be one of float32-le, not 'float16'"),
    (_set("hufunet.dataset.test_sha256", "AB" * 32),
     "field hufunet.dataset.test_sha256 must be 64 lower-case hex digits (a SHA-256), not a string of 64 characters"),
    (_set("model.pt_sha256", 5), "field model.pt_sha256 must be 64 lower-case hex digits (a SHA-256), not 5"),
]  # fmt: skip


@pytest.mark.parametrize(("edit", "message"), FIELD_CASES)
def test_each_field_class_is_refused_naming_the_file_and_field(
    tmp_path: Path, edit: Callable[[dict[str, Any]], Any], message: str
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


def test_the_real_owners_bundle_passes(hufunet_owner: SimpleNamespace) -> None:
    inputs = load_inputs(bundles=[hufunet_owner.out / "owner_bundle.json"], reference=None)
    assert inputs.bundles[0].payload == hufunet_owner.bundle.payload
    HufuNetDetector().validate_bundle(hufunet_owner.bundle.payload)


# ---------------------------------------------------------------- whatever the payload


def _suspect() -> LayerGraph:
    gen = torch.Generator().manual_seed(0)
    shapes = [("conv1", (16, 1, 3, 3)), *((name, tuple(shape)) for name, shape, _ in HOST)]
    layers = [
        Layer(
            name, LayerKind.CONV2D, {"weight": TensorRef.from_tensor(f"{name}.weight", torch.randn(*s, generator=gen))}
        )
        for name, s in shapes
    ]
    return LayerGraph(format="synthetic", path=Path("suspect"), layers=layers, edges=[])


SUSPECT = _suspect()
#: Values some fields accept, so that a good share of the edited payloads get past the schema to the detector.
_PLAUSIBLE = [0, 1, 2, 3, 8, 10, 16, 512, 2048, 2560, 548, 0.5, "conv2d", "linear", "weight", "conv2", [32, 16, 3, 3],
              [64, 32, 3, 3], [10, 8], [10], "float32-le", None]  # fmt: skip
_json = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=6),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=3),
    max_leaves=8,
)  # fmt: skip
_PATHS = ["hufunet", "hufunet.widths", "hufunet.widths.0", "hufunet.widths.4", "hufunet.in_channels",
          "hufunet.num_classes", "hufunet.eph", "hufunet.eph.shapes", "hufunet.eph.data", "hufunet.eph.dtype",
          "hufunet.sph", "hufunet.sph.weight_shape", "hufunet.sph.bias_shape", "hufunet.sph.weight", "hufunet.hmac_key",
          "hufunet.dataset", "hufunet.dataset.name", "hufunet.dataset.split_seed", "hufunet.acc_original", "host",
          "host.layers", "host.layers.0", "host.layers.0.name", "host.layers.0.param", "host.layers.0.kind",
          "host.layers.0.shape", "host.layers.0.kind_index", "host.layers.1.kernels", "host.kernels",
          "host.eph_kernels", "host.architecture", "model", "release", "training", "extra"]  # fmt: skip


@settings(
    max_examples=300, deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow]
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
    # The test split named is not this machine's digits: the finding stops there, after the network is rebuilt.
    finding = audit_bundle(SUSPECT, {"payload": payload, "sha256": "0" * 64}, {})
    assert finding.summary

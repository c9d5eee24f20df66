"""The schema of a Greedy Residuals owner bundle's payload, checked before any suspect is read.

Every field the detector reads is checked for its type, range and length (docs/greedy_residuals.md,
*The owner bundle payload*), and the bounds keep the detector's work proportional to the suspect:
the signature bits and the cells they are pooled to are capped (:data:`MAX_BITS`, :data:`MAX_CELLS`),
and so is the number of watermarked layers (:data:`MAX_LAYERS`), each of which names a layer the
suspect must hold at that shape. The identity itself (whether the signature verifies under the public
key) is the detector's finding, not a schema error.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from auditor.errors import BundleFieldError
from auditor.toolkit.payload import (
    b64,
    choice,
    field,
    flag,
    hex_digest,
    int_list,
    integer,
    items,
    number,
    only_keys,
    optional,
    section,
    text,
)

__all__ = ["KINDS", "MAX_BITS", "MAX_CELLS", "MAX_LAYERS", "validate_payload"]

#: Most signature bits b (the authors use 256).
MAX_BITS = 4096
#: Most cells d = b x b' a layer is pooled to (the authors: 64,768).
MAX_CELLS = 1 << 20
#: Most watermarked layers one bundle may name (the owner's default marks at most three).
MAX_LAYERS = 256
#: Longest copyright statement, in characters.
MAX_MESSAGE = 65_536
#: Largest signature, in bytes (RSA-16384; RSA-3072 signs in 384, Ed25519 in 64).
MAX_SIGNATURE = 2048
#: Longest public key PEM, in characters.
MAX_PUBLIC_KEY = 16_384
#: Longest name (layer, parameter, file, architecture, algorithm), in characters.
MAX_NAME = 4096
#: Largest dimension of a watermarked layer's shape.
MAX_DIM = 2**31 - 1
#: The layer kinds that carry the watermark, and the number of dimensions of their weight.
KINDS = {"conv1d": 3, "conv2d": 4, "linear": 2, "lstm": 2, "gru": 2}
#: The fields of ``params`` (GRParams.to_dict()); another would change the math unread.
PARAM_FIELDS = ("bits", "cells_per_bit", "eta", "mu", "lam", "kept_per_row")


def _params(value: Any) -> None:
    params = section(value, "params")
    only_keys(params, "params", PARAM_FIELDS)
    bits = integer(field(params, "bits", "params"), "params.bits", 1, MAX_BITS)
    per_bit = integer(field(params, "cells_per_bit", "params"), "params.cells_per_bit", 1, MAX_CELLS)
    if bits * per_bit > MAX_CELLS:
        raise BundleFieldError(
            "params.cells_per_bit", f"times params.bits must be at most {MAX_CELLS:,d}, not {per_bit:,d} x {bits:,d}"
        )
    number(field(params, "eta", "params"), "params.eta", 0.0, 1.0, open_low=True)
    number(field(params, "mu", "params"), "params.mu")
    number(field(params, "lam", "params"), "params.lam")
    optional(params, "kept_per_row", "params", integer, 1, per_bit)


def _layer(value: Any, where: str) -> tuple[str, str]:
    """Check one watermarked layer; its ``(name, param)``."""
    layer = section(value, where)
    name = text(field(layer, "name", where), f"{where}.name", MAX_NAME)
    param = layer.get("param", "weight")  # the detector's default too
    text(param, f"{where}.param", MAX_NAME, min_chars=1)
    if not param.startswith("weight"):
        raise BundleFieldError(f"{where}.param", f"must name a weight (weight, weight_hh_l0...), not {param[:40]!r}")
    kind = choice(field(layer, "kind", where), f"{where}.kind", tuple(KINDS))
    int_list(field(layer, "shape", where), f"{where}.shape", (KINDS[kind], KINDS[kind]), 1, MAX_DIM)
    optional(layer, "kind_index", where, integer, 0, MAX_DIM)
    optional(layer, "release_rate", where, number, 0.0, 1.0)
    optional(layer, "batch_norm", where, flag)
    return name, param


def validate_payload(payload: Mapping[str, Any]) -> None:
    """Check a Greedy Residuals payload; :class:`~auditor.errors.BundleFieldError` names the first field
    that is wrong. Fields the detector does not read (``training``) need only be JSON."""
    _params(field(payload, "params", ""))
    text(field(payload, "message", ""), "message", MAX_MESSAGE, min_chars=1)
    b64(field(payload, "signature", ""), "signature", MAX_SIGNATURE, min_bytes=1)
    optional(payload, "signature_algorithm", "", text, MAX_NAME)
    text(field(payload, "public_key", ""), "public_key", MAX_PUBLIC_KEY, min_chars=1)
    seen: dict[tuple[str, str], int] = {}
    for i, entry in enumerate(items(field(payload, "layers", ""), "layers", 1, MAX_LAYERS)):
        key = _layer(entry, f"layers[{i}]")
        if key in seen:
            raise BundleFieldError(f"layers[{i}]", f"names the same parameter as layers[{seen[key]}]")
        seen[key] = i
    model = optional(payload, "model", "", section)
    if model is not None:
        optional(model, "sha256", "model", hex_digest)
        optional(model, "file", "model", text, MAX_NAME)
        optional(model, "parameters", "model", integer, 0, 2**53)
        optional(model, "architecture", "model", text, MAX_NAME)
    optional(payload, "training", "", section)

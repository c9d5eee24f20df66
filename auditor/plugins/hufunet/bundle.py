"""The schema of a HufuNet owner bundle's payload, checked before any suspect is read.

Every field the detector reads is checked for its type, range and length (docs/hufunet.md): the
HufuNet's widths, the EPH and SPH shapes and their base64 weights, byte for byte and finite; the
32-byte key; the public data set's identity; and the host layers, each with the kernel count its
shape gives. The bounds keep the detector's work proportional to the suspect: the network is as small
as its widths allow (``network.MAX_WIDTH``), its EPH must fit in a quarter of the host's kernels
(``placement.MAX_EPH_FRACTION``), and the host's kernel count must be the sum its layers' shapes give,
which the suspect must then hold.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from typing import Any

from auditor.errors import BundleFieldError
from auditor.toolkit.payload import (
    b64,
    choice,
    field,
    hex_digest,
    int_list,
    integer,
    items,
    number,
    optional,
    section,
    shown,
    text,
)

__all__ = ["HOST_KINDS", "MAX_HOST_LAYERS", "validate_payload"]

#: Most host layers one bundle may record.
MAX_HOST_LAYERS = 4096
#: Longest name (layer, parameter, file, architecture, data set), in characters.
MAX_NAME = 4096
#: Largest dimension of a host layer's shape.
MAX_DIM = 2**31 - 1
#: The host layer kinds (3x3 convolutions, and weight matrices viewed as groups of nine) and their ranks.
HOST_KINDS = {"conv2d": 4, "linear": 2, "lstm": 2, "gru": 2}
#: How the weights are stored: base64 of float32 little-endian bytes.
WEIGHT_DTYPE = "float32-le"


def _must_equal(obj: Mapping[str, Any], name: str, path: str, expected: Any, why: str) -> None:
    given = field(obj, name, path)
    if given != expected or isinstance(given, bool):
        raise BundleFieldError(f"{path}.{name}", f"must be {expected}, {why}, not {shown(given)}")


def _floats(obj: Mapping[str, Any], name: str, path: str, count: int) -> None:
    """Base64 of exactly ``count`` finite float32 little-endian values."""
    import numpy as np

    data = b64(field(obj, name, path), f"{path}.{name}", 4 * count, min_bytes=4 * count)
    if not np.isfinite(np.frombuffer(data, dtype="<f4")).all():
        raise BundleFieldError(f"{path}.{name}", "holds a NaN or an infinity")


def _hufunet(value: Any) -> int:
    """Check the HufuNet section; the number K of its EPH kernels."""
    from auditor.plugins.hufunet.generate import KEY_BYTES
    from auditor.plugins.hufunet.network import MAX_CLASSES, MAX_IN_CHANNELS, MAX_WIDTH

    net = section(value, "hufunet")
    widths = int_list(field(net, "widths", "hufunet"), "hufunet.widths", (5, 5), 1, MAX_WIDTH)
    in_channels = integer(field(net, "in_channels", "hufunet"), "hufunet.in_channels", 1, MAX_IN_CHANNELS)
    classes = integer(field(net, "num_classes", "hufunet"), "hufunet.num_classes", 2, MAX_CLASSES)
    convs = [[b, a, 3, 3] for a, b in itertools.pairwise([in_channels, *widths])]
    for name, shapes in (
        ("eph", {"shapes": convs}),
        ("sph", {"weight_shape": [classes, widths[-1]], "bias_shape": [classes]}),
    ):
        weights = section(field(net, name, "hufunet"), f"hufunet.{name}")
        optional(weights, "dtype", f"hufunet.{name}", choice, (WEIGHT_DTYPE,))
        for key, expected in shapes.items():
            _must_equal(weights, key, f"hufunet.{name}", expected, "for the network's widths and classes")
    _floats(net["eph"], "data", "hufunet.eph", sum(math.prod(s) for s in convs))
    _floats(net["sph"], "weight", "hufunet.sph", classes * widths[-1])
    _floats(net["sph"], "bias", "hufunet.sph", classes)
    b64(field(net, "hmac_key", "hufunet"), "hufunet.hmac_key", KEY_BYTES, min_bytes=KEY_BYTES)
    dataset = section(field(net, "dataset", "hufunet"), "hufunet.dataset")
    text(field(dataset, "name", "hufunet.dataset"), "hufunet.dataset.name", MAX_NAME, min_chars=1)
    hex_digest(field(dataset, "test_sha256", "hufunet.dataset"), "hufunet.dataset.test_sha256")
    optional(dataset, "split_seed", "hufunet.dataset", integer, 0, 2**63 - 1)
    number(field(net, "acc_original", "hufunet"), "hufunet.acc_original", 0.0, 1.0)
    return sum(math.prod(s[:2]) for s in convs)


def _host_layer(value: Any, where: str) -> int:
    """Check one host layer; its kernel count."""
    layer = section(value, where)
    text(field(layer, "name", where), f"{where}.name", MAX_NAME)
    param = text(field(layer, "param", where), f"{where}.param", MAX_NAME, min_chars=1)
    if not param.startswith("weight"):
        raise BundleFieldError(f"{where}.param", f"must name a weight (weight, weight_hh_l0...), not {shown(param)}")
    kind = choice(field(layer, "kind", where), f"{where}.kind", tuple(HOST_KINDS))
    rank = HOST_KINDS[kind]
    shape = int_list(field(layer, "shape", where), f"{where}.shape", (rank, rank), 1, MAX_DIM)
    if kind == "conv2d" and shape[2:] != [3, 3]:
        raise BundleFieldError(f"{where}.shape", f"must be a 3x3 convolution's [out, in, 3, 3], not {shape}")
    optional(layer, "kind_index", where, integer, 0, MAX_DIM)
    # As the owner counts them (placement.host_kernel_count): one per 3x3 kernel, or nine weights of a matrix.
    kernels = shape[0] * shape[1] if kind == "conv2d" else shape[0] * shape[1] // 9
    _must_equal(layer, "kernels", where, kernels, f"the kernels of shape {shape}")
    return kernels


def _host(value: Any, eph_kernels: int) -> None:
    from auditor.plugins.hufunet.placement import MAX_EPH_FRACTION

    host = section(value, "host")
    optional(host, "architecture", "host", text, MAX_NAME)
    optional(host, "width", "host", integer, 1, MAX_DIM)
    layers = items(field(host, "layers", "host"), "host.layers", 1, MAX_HOST_LAYERS)
    n = sum(_host_layer(entry, f"host.layers[{i}]") for i, entry in enumerate(layers))
    _must_equal(host, "kernels", "host", n, "the sum of the host layers' kernels")
    if eph_kernels > n * MAX_EPH_FRACTION:
        raise BundleFieldError(
            "host.kernels",
            f"must be at least {math.ceil(eph_kernels / MAX_EPH_FRACTION):,d} for the HufuNet's {eph_kernels:,d} EPH"
            f" kernels (at most {MAX_EPH_FRACTION:.0%} of the host's), not {n:,d}",
        )
    if "eph_kernels" in host:
        _must_equal(host, "eph_kernels", "host", eph_kernels, "the HufuNet's EPH kernels")
    optional(host, "eph_fraction", "host", number, 0.0, MAX_EPH_FRACTION)


def validate_payload(payload: Mapping[str, Any]) -> None:
    """Check a HufuNet payload; :class:`~auditor.errors.BundleFieldError` names the first field that is
    wrong. Fields the detector does not read (``training``) need only be JSON."""
    _host(field(payload, "host", ""), _hufunet(field(payload, "hufunet", "")))
    model = optional(payload, "model", "", section)
    if model is not None:
        for name in ("file", "pt_file"):
            optional(model, name, "model", text, MAX_NAME)
        for name in ("sha256", "pt_sha256"):
            optional(model, name, "model", hex_digest)
    release = optional(payload, "release", "", section)
    if release is not None:
        for name in ("acc_combined", "bit_identical_fraction"):
            optional(release, name, "release", number, 0.0, 1.0)
    optional(payload, "training", "", section)

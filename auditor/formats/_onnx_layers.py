"""ONNX layer recognition: which nodes are conv, linear, recurrent, norm or embedding layers.

Split from :mod:`auditor.formats.onnx`, which reads tensors and builds the
graph: given a node and its weights (followed back through Identity, Cast,
Transpose, Reshape and DequantizeLinear by :mod:`auditor.formats._onnx_graph`),
these functions decide the layer's kind, its canonical parameters (PyTorch
layout and gate order) and its name.

Integer-quantised layers (ConvInteger, MatMulInteger, QLinearConv,
QLinearMatMul) become conv and linear layers whose int8/uint8 weights carry
their :class:`~auditor.graph.Quantization`, so that they read back as float32;
the layer's ``quantized`` attribute records the scheme. ConvInteger and
MatMulInteger hold no weight scale: onnxruntime's ``quantize_dynamic`` rescales
their int32 output with Cast -> Mul(input scale x weight scale) [-> Add bias],
and the weight scale is the constant factor of that product.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from auditor.formats._onnx_graph import (
    Param,
    Scope,
    StoredTensor,
    Unusable,
    attr_value,
    float_attr,
    int_attr,
    integer_weight,
    ints_attr,
    make_ref,
    plan_steps,
    resolve,
)
from auditor.graph import LayerKind, TensorRef

__all__ = ["Found", "layer_name", "recognise", "recognise_norm_scale"]

_MODULE_NAME = re.compile(r"^(?!onnx::)(.+)\.[A-Za-z_][A-Za-z0-9_]*$")
_LSTM_ORDER = (0, 2, 3, 1)  # ONNX i, o, f, c -> PyTorch i, f, g, o
_GRU_ORDER = (1, 0, 2)  # ONNX z, r, h -> PyTorch r, z, n


@dataclass
class Found:
    """A recognised layer before naming: params, attrs and where it sits in its graph."""

    kind: LayerKind
    node: Any
    params: dict[str, TensorRef]
    attrs: dict[str, Any]
    names: list[str]  # value and tensor names to derive the layer name from, in order of preference
    in_node: int
    out_node: int
    data_input: str
    channels: int | None = None
    rank: int | None = None


def _conv(
    g: Scope, node: Any, attrs: dict[str, Any], p: dict[str, Param]
) -> tuple[LayerKind, dict[str, TensorRef], dict[str, Any]]:
    w = make_ref(p["weight"])
    if len(w.shape) < 3:
        raise Unusable(f"weight of shape {list(w.shape)} is not a convolution kernel")
    kind = {3: LayerKind.CONV1D, 4: LayerKind.CONV2D}.get(len(w.shape), LayerKind.OTHER)
    params = {"weight": w}
    if "bias" in p:
        params["bias"] = make_ref(p["bias"])
    out: dict[str, Any] = {"groups": int_attr(attrs, "group", 1)}
    for onnx_name, name in (("strides", "stride"), ("dilations", "dilation"), ("kernel_shape", "kernel_size")):
        if (value := ints_attr(attrs, onnx_name)) is not None:
            out[name] = value
    pads = ints_attr(attrs, "pads")
    if pads is not None:
        half = len(pads) // 2
        out["padding" if pads[:half] == pads[half:] else "pads"] = pads[:half] if pads[:half] == pads[half:] else pads
    if attrs.get("auto_pad", "NOTSET") != "NOTSET":
        out["auto_pad"] = str(attrs["auto_pad"])
    if kind is LayerKind.OTHER:
        out["op"] = "Conv"
    return kind, params, out


def _gemm(
    attrs: dict[str, Any], p: dict[str, Param], notes: list[str], label: str, in_out: bool = False
) -> tuple[dict[str, TensorRef], dict[str, Any]]:
    """Gemm's or MatMul's weight ``(out, in)``, or ``(in, out)`` with ``in_out`` (as the module holds it)."""
    alpha, beta = float_attr(attrs, "alpha", 1.0), float_attr(attrs, "beta", 1.0)
    trans_b = int_attr(attrs, "transB", 0)
    steps: list[tuple[Any, ...]] = [] if bool(trans_b) != in_out else [("perm", (1, 0))]
    if alpha != 1.0:
        steps.append(("scale", alpha))
    w = make_ref(p["weight"], steps)
    if len(w.shape) != 2:
        raise Unusable(f"weight of shape {list(w.shape)} is not a matrix")
    params = {"weight": w}
    outputs = w.shape[1 if in_out else 0]
    if "bias" in p:
        bias = p["bias"]
        if math.prod(bias.base.shape) == outputs:
            params["bias"] = make_ref(bias, [("reshape", (outputs,))] + ([("scale", beta)] if beta != 1.0 else []))
        else:
            notes.append(
                f"{label}: bias of shape {list(bias.base.shape)} broadcasts over the outputs; not recorded as a bias"
            )
    out = {"alpha": alpha, "beta": beta, "transA": int_attr(attrs, "transA", 0), "transB": trans_b}
    if out["transA"]:
        notes.append(f"{label}: Gemm with transA=1 takes its input transposed")
    return params, out


def _recurrent(
    op: str, attrs: dict[str, Any], p: dict[str, Param], notes: list[str], label: str
) -> tuple[dict[str, TensorRef], dict[str, Any]]:
    gates, order = (4, _LSTM_ORDER) if op == "LSTM" else (3, _GRU_ORDER)
    direction = attrs.get("direction", "forward")
    dirs = 2 if direction == "bidirectional" else 1
    w_shape = p["W"].base.shape
    hidden = int_attr(attrs, "hidden_size", w_shape[1] // gates if len(w_shape) == 3 else 0)
    if len(w_shape) != 3 or w_shape[0] != dirs or w_shape[1] != gates * hidden or hidden <= 0:
        raise Unusable(f"W of shape {list(w_shape)} does not fit {dirs} direction(s) of {gates} gates x {hidden}")
    params: dict[str, TensorRef] = {}
    for d in range(dirs):
        suffix = "_reverse" if d else ""
        params[f"weight_ih_l0{suffix}"] = make_ref(p["W"], [("select", d), ("blocks", order)])
        params[f"weight_hh_l0{suffix}"] = make_ref(p["R"], [("select", d), ("blocks", order)])
        if "B" in p:
            rows = gates * hidden
            params[f"bias_ih_l0{suffix}"] = make_ref(p["B"], [("select", d), ("rows", 0, rows), ("blocks", order)])
            params[f"bias_hh_l0{suffix}"] = make_ref(
                p["B"], [("select", d), ("rows", rows, 2 * rows), ("blocks", order)]
            )
    out: dict[str, Any] = {"hidden_size": hidden, "bidirectional": dirs == 2, "num_layers": 1}
    if direction == "reverse":
        out["direction"] = "reverse"
        notes.append(f"{label}: runs in reverse only, which PyTorch has no module for; its weights are under *_l0")
    if "layout" in attrs:
        out["batch_first"] = int_attr(attrs, "layout", 0) == 1
    out.update(_recurrent_extras(attrs))
    if op == "GRU" and not out.get("linear_before_reset", 0):
        notes.append(f"{label}: GRU with linear_before_reset=0 computes differently from PyTorch's GRU")
    return params, out


def _recurrent_extras(attrs: dict[str, Any]) -> dict[str, Any]:
    """The recurrent attributes a layer records as they are, each checked for its type."""
    out: dict[str, Any] = {}
    for key in ("linear_before_reset", "input_forget"):
        if key in attrs:
            out[key] = int_attr(attrs, key, 0)
    if "clip" in attrs:
        out["clip"] = float_attr(attrs, "clip", 0.0)
    if "activations" in attrs:
        activations = attrs["activations"]
        if not isinstance(activations, list):
            raise Unusable("attribute 'activations' is not a list of names")
        out["activations"] = activations
    return out


_INTEGER_OPS = ("ConvInteger", "MatMulInteger", "QLinearConv", "QLinearMatMul")


def _only_reader(g: Scope, consumers: dict[str, list[int]], value: str) -> tuple[int, Any] | None:
    if not value or value in g.outputs or len(readers := consumers.get(value, [])) != 1:
        return None
    return readers[0], g.proto.node[readers[0]]


def _rescale(g: Scope, node: Any, consumers: dict[str, list[int]]) -> tuple[StoredTensor, int, Param | None]:
    """The weight scale, last node and bias of an integer op's dynamic-quantisation tail:
    Cast -> Mul(S) [-> Add(bias)] with S = Mul(input scale, constant weight scale)."""
    unknown = Unusable("its int32 output is not cast and multiplied by an input scale x a weight scale")
    cast = _only_reader(g, consumers, node.output[0] if node.output else "")
    if cast is None or cast[1].op_type != "Cast" or not cast[1].output:
        raise unknown
    mul = _only_reader(g, consumers, cast[1].output[0])
    if mul is None or mul[1].op_type != "Mul" or len(mul[1].input) != 2 or not mul[1].output:
        raise unknown
    other = [v for v in mul[1].input if v != cast[1].output[0]]
    product = g.producer(other[0]) if len(other) == 1 else None
    if product is None or product.op_type != "Mul":
        raise unknown
    constant = [t for v in product.input if (t := g.tensor(v)) is not None]
    if len(constant) != 1 or len(product.input) != 2:
        raise Unusable("the output scale is not one input scale times one constant weight scale")
    out_node, bias = mul[0], None
    add = _only_reader(g, consumers, mul[1].output[0])
    if add is not None and add[1].op_type == "Add" and len(add[1].input) == 2:
        rest = [v for v in add[1].input if v != mul[1].output[0]]
        if len(rest) == 1 and (b := resolve(g, rest[0])) is not None:
            out_node, bias = add[0], b
    return constant[0], out_node, bias


def _qlinear_bias(g: Scope, ins: list[str], w: Param, notes: list[str], label: str) -> Param | None:
    """QLinearConv's int32 bias, whose scale is the input scale x the weight scale and zero point 0."""
    import numpy as np
    import torch

    from auditor.graph import Quantization

    b = resolve(g, ins[8]) if len(ins) > 8 and ins[8] else None
    if b is None:
        return None
    x_scale = g.tensor(ins[1])
    if x_scale is None or math.prod(x_scale.shape) != 1 or b.quant is not None or b.base.dtype != "int32":
        notes.append(f"{label}: the int32 bias has no constant scale; not recorded as a bias")
        return None
    assert w.quant is not None  # integer_weight always sets it
    factor = float(x_scale.read().to(torch.float64).reshape(()).item())
    if not math.isfinite(factor):
        raise Unusable(f"input scale {x_scale.name!r} is not finite")
    scale = np.asarray(w.quant.scale, dtype=np.float32) * np.float32(factor)
    return Param(b.base, b.seen_as, b.steps, Quantization(scale, np.zeros(scale.shape, np.int64), w.quant.axis))


def _integer(g: Scope, index: int, node: Any, consumers: dict[str, list[int]], notes: list[str]) -> Found | None:
    """A ConvInteger, MatMulInteger, QLinearConv or QLinearMatMul layer with dequantised weights."""
    op, ins = node.op_type, list(node.input)
    label = f"{op} node {node.name!r}" + ("" if g.parent is None else f" in {g.origin}")
    attrs = {a.name: attr_value(a) for a in node.attribute}
    qlinear = op.startswith("QLinear")
    w_at = 3 if qlinear else 1
    if len(ins) <= w_at or not ins[w_at] or not ins[0]:
        raise Unusable("the data input or the weight is missing")
    if resolve(g, ins[0]) is not None:
        return None  # two constants multiplied: no layer
    conv = op in ("ConvInteger", "QLinearConv")
    bias: Param | None = None
    out_node = index
    if qlinear:
        if len(ins) < 6 or not ins[5]:
            notes.append(f"{label}: the weight zero point (required by ONNX) is missing; read as 0")
        w = integer_weight(g, ins[3], g.tensor(ins[4]) if len(ins) > 4 else None, ins[5] if len(ins) > 5 else "",
                           0 if conv else 1)  # fmt: skip
    else:
        if resolve(g, ins[1]) is None:
            notes.append(f"{label}: the weight is computed, not stored; not a layer")
            return None
        scale, out_node, bias = _rescale(g, node, consumers)
        w = integer_weight(g, ins[1], scale, ins[3] if len(ins) > 3 else "", 0 if conv else 1)
    if w is None:
        notes.append(f"{label}: the weight is computed, not stored; not a layer")
        return None
    if conv:
        if qlinear:
            bias = _qlinear_bias(g, ins, w, notes, label)
        kind, params, out = _conv(g, node, attrs, {"weight": w})
        channels = params["weight"].shape[0]
        if bias is not None:
            bias_shape = plan_steps(bias.base.shape, bias.steps)[0]
            if math.prod(bias_shape) == channels:
                params["bias"] = make_ref(bias, [] if bias_shape == (channels,) else [("reshape", (channels,))])
            else:
                notes.append(f"{label}: bias of shape {list(bias.base.shape)} does not fit; not recorded as a bias")
        rank: int | None = len(params["weight"].shape)
    else:
        p = {"weight": w} | ({"bias": bias} if bias is not None else {})
        params, _ = _gemm({}, p, notes, label)
        out, kind, channels, rank = {}, LayerKind.LINEAR, params["weight"].shape[0], None
    names = [n for q in (w, bias) if q is not None for n in (q.seen_as, q.base.name)]
    return Found(kind, node, params, out, names, index, out_node, ins[0], channels, rank)


def _quantized(op: str, ref: TensorRef) -> dict[str, Any]:
    """What the ``quantized`` attribute records: the op, stored type, scheme and zero point."""
    import numpy as np

    q = ref.quantization
    assert q is not None
    zero = np.asarray(q.zero_point).reshape(-1)
    uniform = zero.size > 0 and bool((zero == zero[0]).all())
    out: dict[str, Any] = {"op": op, "dtype": ref.dtype, "scheme": "per-tensor" if q.axis is None else "per-channel"}
    out["zero_point"] = int(zero[0]) if uniform else "per-channel"
    if q.axis is not None:
        out["axis"] = q.axis
    return out


def recognise(
    g: Scope, index: int, node: Any, consumers: dict[str, list[int]], notes: list[str], *, in_out: bool = False
) -> Found | None:
    """The layer ``node`` computes, or ``None`` when it has no weights auditor reads. ``in_out``: a Gemm's or
    MatMul's weight is given as its module holds it, ``(in, out)`` (see :mod:`._onnx_names`)."""
    found = _recognise(g, index, node, consumers, notes, in_out=in_out)
    weight = found.params.get("weight") if found is not None else None
    if found is not None and weight is not None and weight.quantization is not None:
        found.attrs["quantized"] = _quantized(node.op_type, weight)
    return found


def _recognise(
    g: Scope, index: int, node: Any, consumers: dict[str, list[int]], notes: list[str], *, in_out: bool
) -> Found | None:
    op = node.op_type
    if op in _INTEGER_OPS:
        return _integer(g, index, node, consumers, notes)
    ins = list(node.input)
    label = f"{op} node {node.name!r}" + ("" if g.parent is None else f" in {g.origin}")

    def param(i: int) -> Param | None:
        return resolve(g, ins[i]) if i < len(ins) and ins[i] else None

    attrs = {a.name: attr_value(a) for a in node.attribute}
    p: dict[str, Param] = {}
    out_node, data_input = index, ins[0] if ins else ""
    channels: int | None = None
    rank: int | None = None
    if op == "Conv":
        for role, i in (("weight", 1), ("bias", 2)):
            if (found := param(i)) is not None:
                p[role] = found
        if "weight" not in p:
            notes.append(f"{label}: the weight is computed, not stored; not a layer")
            return None
        kind, params, out = _conv(g, node, attrs, p)
        channels, rank = params["weight"].shape[0], len(params["weight"].shape)
    elif op in ("Gemm", "MatMul"):
        if len(ins) < 2 or param(0) is not None or (w := param(1)) is None:
            return None
        p["weight"] = w
        if op == "Gemm" and (b := param(2)) is not None:
            p["bias"] = b
        elif op == "MatMul" and len(w.base.shape) == 2 and node.output and node.output[0] not in g.outputs:
            readers = consumers.get(node.output[0], [])
            if len(readers) == 1 and g.proto.node[readers[0]].op_type == "Add":
                add = g.proto.node[readers[0]]
                other = [v for v in add.input if v != node.output[0]]
                b = resolve(g, other[0]) if len(other) == 1 else None
                if b is not None and math.prod(b.base.shape) == plan_steps(w.base.shape, w.steps)[0][-1]:
                    p["bias"], out_node = b, readers[0]
        gemm_attrs = attrs if op == "Gemm" else {}
        params, out = _gemm(gemm_attrs, p, notes, label, in_out)
        if op == "MatMul":
            out = {}
        kind = LayerKind.LINEAR
        channels = params["weight"].shape[1 if in_out else 0]
    elif op in ("LSTM", "GRU"):
        for role, i in (("W", 1), ("R", 2), ("B", 3)):
            if (found := param(i)) is not None:
                p[role] = found
        if "W" not in p or "R" not in p:
            return _torch_named_recurrent(g, index, node, notes, label)
        if len(ins) > 7 and ins[7]:
            notes.append(f"{label}: peephole weights P are not represented")
        params, out = _recurrent(op, attrs, p, notes, label)
        kind = LayerKind.LSTM if op == "LSTM" else LayerKind.GRU
        rank = 4
    elif op == "BatchNormalization":
        for role, i in (("weight", 1), ("bias", 2), ("running_mean", 3), ("running_var", 4)):
            if (found := param(i)) is None:
                notes.append(f"{label}: {role} is computed, not stored; not a layer")
                return None
            p[role] = found
        params = {role: make_ref(q) for role, q in p.items()}
        out = {"eps": float_attr(attrs, "epsilon", 1e-5), "momentum": float_attr(attrs, "momentum", 0.9)}
        if "training_mode" in attrs:
            out["training_mode"] = int_attr(attrs, "training_mode", 0)
        kind = LayerKind.BATCH_NORM
        channels = params["weight"].shape[0] if params["weight"].shape else None
    elif op == "LayerNormalization":
        for role, i in (("weight", 1), ("bias", 2)):
            if (found := param(i)) is not None:
                p[role] = found
        if "weight" not in p:
            return None
        params = {role: make_ref(q) for role, q in p.items()}
        out = {"eps": float_attr(attrs, "epsilon", 1e-5), "axis": int_attr(attrs, "axis", -1)}
        kind = LayerKind.LAYER_NORM
    elif op == "Gather":
        if len(ins) < 2 or (w := param(0)) is None or param(1) is not None or int_attr(attrs, "axis", 0) != 0:
            return None
        p["weight"] = w
        params = {"weight": make_ref(w)}
        if len(params["weight"].shape) != 2:
            return None
        out, kind, data_input = {}, LayerKind.EMBEDDING, ""
        channels = params["weight"].shape[1]
    else:
        return None
    names = [n for q in p.values() for n in (q.seen_as, q.base.name)]
    return Found(kind, node, params, out, names, index, out_node, data_input, channels, rank)


def recognise_norm_scale(g: Scope, index: int, node: Any) -> Found | None:
    """A norm module's weight applied as ``Mul(weight, x)`` (RMSNorm decomposed by the dynamo exporter): a
    layer-norm layer with that weight, or None when neither input is a stored vector. The caller decides from
    the node's module class that it is a norm: a Mul alone says nothing."""
    ins = [v for v in node.input if v]
    if node.op_type != "Mul" or len(ins) != 2:
        return None
    stored = [(k, p) for k, v in enumerate(ins) if (p := resolve(g, v)) is not None]
    if len(stored) != 1:
        return None
    k, p = stored[0]
    ref = make_ref(p)
    if len(ref.shape) != 1 or ref.shape[0] < 2:
        return None
    names = [p.seen_as, p.base.name]
    return Found(LayerKind.LAYER_NORM, node, {"weight": ref}, {}, names, index, index, ins[1 - k], ref.shape[0])


_TORCH_RNN = re.compile(r"^(.*?)\.?(weight|bias)_(ih|hh)_l(\d+)(_reverse)?$")


def _torch_named_recurrent(g: Scope, index: int, node: Any, notes: list[str], label: str) -> Found | None:
    """An LSTM/GRU whose W, R, B are computed from PyTorch-named tensors (legacy export without constant folding).

    That exporter slices ``weight_ih_l0``... into ONNX gate order inside the
    graph; the PyTorch tensors it starts from are already canonical, so they
    are taken as they are, found by walking back from W, R and B.
    """
    attrs = {a.name: attr_value(a) for a in node.attribute}
    found: dict[str, StoredTensor] = {}
    layer_index: set[str] = set()
    prefixes: set[str] = set()
    for value in list(node.input[1:4]):
        stack, seen = [value], set[str]()
        while stack and len(seen) < 256:
            current = stack.pop()
            if not current or current in seen:
                continue
            seen.add(current)
            t = g.tensor(current)
            if t is not None:
                if m := _TORCH_RNN.match(t.name):
                    found[f"{m.group(2)}_{m.group(3)}_l0{m.group(5) or ''}"] = t
                    layer_index.add(m.group(4))
                    prefixes.add(m.group(1))
                continue
            producer = g.producer(current)
            if producer is not None:
                stack.extend(producer.input)
    if "weight_ih_l0" not in found or "weight_hh_l0" not in found or len(layer_index) != 1:
        notes.append(f"{label}: W or R is computed, not stored, and not from PyTorch-named tensors; not a layer")
        return None
    gates = 4 if node.op_type == "LSTM" else 3
    hidden = int_attr(attrs, "hidden_size", 0)
    if any(len(t.shape) not in (1, 2) or t.shape[0] != gates * hidden for t in found.values()):
        raise Unusable(f"PyTorch-named tensors do not fit {gates} gates x {hidden}")
    params = {
        role: TensorRef(t.name, t.shape, t.dtype, t.read)
        for role, t in sorted(found.items(), key=lambda kv: _ROLE_ORDER.index(kv[0]))
    }
    out: dict[str, Any] = {
        "hidden_size": hidden,
        "bidirectional": attrs.get("direction") == "bidirectional",
        "num_layers": 1,
    }
    out.update(_recurrent_extras(attrs))
    if "layout" in attrs:
        out["layout"] = int_attr(attrs, "layout", 0)
    kind = LayerKind.LSTM if node.op_type == "LSTM" else LayerKind.GRU
    names = [f"{prefix}.weight_ih" for prefix in sorted(prefixes) if prefix]
    return Found(kind, node, params, out, names, index, index, node.input[0] if node.input else "", None, 4)


_ROLE_ORDER = [f"{w}_{x}_l0{r}" for r in ("", "_reverse") for w in ("weight", "bias") for x in ("ih", "hh")]


def layer_name(found: Found, index: int, used: set[str], module: str = "") -> str:
    """``module`` (the exporter's module path, where it recorded one), else ``prefix`` of the first
    ``prefix.weight``-style name, else the node name; made unique with ``_1``, ``_2``..."""
    base = module or next((m.group(1) for n in found.names if (m := _MODULE_NAME.match(n))), None)
    base = base or found.node.name or f"{found.node.op_type}_{index}"
    name, k = base, 0
    while name in used:
        k += 1
        name = f"{base}_{k}"
    used.add(name)
    return name

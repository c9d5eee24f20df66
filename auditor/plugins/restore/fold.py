"""Undo batch-norm folding: give a folded convolution its batch-norm back, in the reference's layout.

``torch.onnx`` folds an eval-mode batch-norm into the convolution before it:
``W_f = W * g``, ``b_f = beta - mean * g`` with ``g = gamma / sqrt(var + eps)``
per output channel (negative where gamma is). The detectors read the
convolution's weight and the owner's bundle describes the unfolded one, so
the suspect is unfolded rather than the reference folded: comparing folded
with folded would also work for a sign-based detector, but HufuNet reads
exact kernel values and the owner's release rates are measured on the
unfolded weights; unfolding compares like with like for every detector.

With channels already in the reference's order, each channel's factor is the
least-squares ratio ``a = <W_f, W_ref> / <W_ref, W_ref>``; the restored
convolution is ``W_f / a`` without a bias, followed by a new batch-norm with
the reference's running statistics and ``gamma' = a * sqrt(var_ref + eps)``,
``beta' = b_f + a * mean_ref``. That batch-norm computes exactly what the
folded convolution did, so the restored model keeps the suspect's function,
and for a plain fold it equals the reference's batch-norm.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from auditor.graph import Edge, EdgeSource, Layer, LayerGraph, LayerKind, TensorRef
from auditor.plugins.restore.align import per_channel_edges
from auditor.plugins.restore.factors import least_squares_factors
from auditor.plugins.restore.plan import Plan
from auditor.toolkit.channels import DEFAULT_EPS, PRODUCER_KINDS, is_pass_through

__all__ = ["unfold"]


def _following_bn(graph: LayerGraph, name: str, edges: list[Edge] | None = None) -> Layer | None:
    layers = {layer.name: layer for layer in graph.layers}
    for e in per_channel_edges(graph) if edges is None else edges:
        if e.src == name and e.dst in layers and layers[e.dst].kind is LayerKind.BATCH_NORM:
            if is_pass_through(layers[e.dst]):
                return layers[e.dst]
    return None


def unfold(suspect: LayerGraph, reference: LayerGraph, plan: Plan) -> tuple[LayerGraph | None, list[dict[str, Any]]]:
    """The suspect with every folded layer unfolded (None if there is none) and one log entry per layer."""
    # Copies throughout, so that nothing done to the result can reach the input graph.
    layers = [dataclasses.replace(x, params=dict(x.params), attrs=dict(x.attrs)) for x in suspect.layers]
    edges = list(suspect.edges)
    entries: list[dict[str, Any]] = []
    names = {layer.name for layer in layers}
    for layer in suspect.layers:
        ref_name = plan.alignment.reference_of(layer.name)
        if layer.kind not in PRODUCER_KINDS or ref_name is None or "bias" not in layer.params:
            continue
        ref_bn = _following_bn(reference, ref_name)
        if ref_bn is None or _following_bn(suspect, layer.name, plan.edges) is not None:
            continue
        ref_layer = reference.layer(ref_name)
        if layer.params["weight"].shape != ref_layer.params["weight"].shape or "bias" in ref_layer.params:
            why = "its shape or bias differs from the reference's: channels not yet restored"
            entries.append({"name": layer.name, "unfolded": False, "note": why})
            continue
        w = layer.params["weight"].read(float32=True)
        b = layer.params["bias"].read(float32=True)
        a = least_squares_factors(w, ref_layer.params["weight"].read(float32=True))
        zero = torch.isnan(a)  # a padded (cut-off) channel: nothing to divide, and it stays silent
        a = torch.where(zero, torch.ones_like(a), a)
        eps = float(ref_bn.attrs.get("eps", DEFAULT_EPS))
        mean = ref_bn.params["running_mean"].read(float32=True).to(torch.float64)
        var = ref_bn.params["running_var"].read(float32=True).to(torch.float64)
        gamma = torch.where(zero, torch.zeros_like(a), a * torch.sqrt(var + eps))
        beta = b.to(torch.float64) + torch.where(zero, torch.zeros_like(a), a * mean)
        shape = (-1,) + (1,) * (w.ndim - 1)
        new_w = (w.to(torch.float64) / a.reshape(shape)).to(torch.float32)
        bn_name = ref_bn.name if ref_bn.name not in names else f"{layer.name}.unfolded_bn"
        names.add(bn_name)
        bn = Layer(
            name=bn_name, kind=LayerKind.BATCH_NORM, source=f"restored from the bias of {layer.name}",
            params={
                "weight": TensorRef.from_tensor(f"{bn_name}.weight", gamma.to(torch.float32)),
                "bias": TensorRef.from_tensor(f"{bn_name}.bias", beta.to(torch.float32)),
                "running_mean": TensorRef.from_tensor(f"{bn_name}.running_mean", mean.to(torch.float32)),
                "running_var": TensorRef.from_tensor(f"{bn_name}.running_var", var.to(torch.float32)),
            },
            attrs={"eps": eps, "restored": "unfolded"},
        )  # fmt: skip
        conv = dataclasses.replace(
            layer, params={"weight": TensorRef.from_tensor(layer.params["weight"].name, new_w)},
            attrs={**layer.attrs, "restored": "unfolded"},
        )  # fmt: skip
        at = next(i for i, item in enumerate(layers) if item.name == layer.name)
        layers[at : at + 1] = [conv, bn]
        source = suspect.edge_source if suspect.edge_source is not EdgeSource.ABSENT else EdgeSource.INFERRED
        edges = [dataclasses.replace(e, src=bn_name) if e.src == layer.name else e for e in edges]
        edges.append(Edge(layer.name, bn_name, (), 0, source))
        finite = a[~zero]
        entries.append({
            "name": layer.name, "reference": ref_name, "unfolded": True, "batch_norm": bn_name,
            "reference_batch_norm": ref_bn.name, "eps": eps,
            "factor_min": float(finite.min()) if finite.numel() else None,
            "factor_max": float(finite.max()) if finite.numel() else None,
            "negative_channels": int((finite < 0).sum()), "silent_channels": int(zero.sum()),
        })  # fmt: skip
    if not any(e.get("unfolded") for e in entries):
        return None, entries
    graph = dataclasses.replace(
        suspect, layers=layers, edges=edges, files=list(suspect.files), metadata=dict(suspect.metadata),
        notes=[*suspect.notes, "restore-fold: batch-norm unfolded from folded convolutions (see the restore log)"],
    )  # fmt: skip
    return graph, entries

"""Module paths and parameter names from the metadata torch's dynamo exporter writes.

``torch.onnx.export(..., dynamo=True)`` names most of its values after the
traced program (``val_105``, ``linear_3``), not after the module: a linear
layer's weight becomes a pre-transposed initializer ``val_105`` fed to a
MatMul, and the optimizer merges initializers of equal value (a random model's
zero biases and unit norm weights share one tensor, named after the first).
What it keeps is text metadata on every node and on the model:

* ``pkg.torch.onnx.name_scopes`` on a node: the module paths it was traced
  in, outermost first, and the traced node's own name last
  (``['', 'model', 'model.layers.0', 'model.layers.0.self_attn.q_proj', 'linear']``);
* ``pkg.torch.onnx.class_hierarchy``: the classes of those modules and the op
  (``[..., 'torch.nn.modules.linear.Linear', 'aten.linear.default']``);
* ``pkg.torch.onnx.fx_node``: the traced call, whose arguments name the
  parameters it reads (``%p_model_layers_0_self_attn_q_proj_weight``);
* ``pkg.torch.export.ExportedProgram.graph_signature`` on the graph: each such
  placeholder's state-dict name (``... PARAMETER target='model.layers.0.self_attn.q_proj.weight'``).

This module only parses that text (bounded, with regular expressions; nothing
is evaluated): :func:`read_origins` gives each node's :class:`Origin`. The
loader uses it to name a layer by its module path, to keep a weight in the
layout its module holds it in (``aten.addmm``, as transformers' ``Conv1D``
computes, reads its weight ``(in, out)``), and to tell one parameter used by
two modules (tied weights: one layer) from two parameters the optimizer
merged (two layers). Metadata is a claim of the file, like every name: it
names layers and proves nothing about their values.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

__all__ = ["SIGNATURE", "Origin", "read_origins"]

SIGNATURE = "pkg.torch.export.ExportedProgram.graph_signature"
_SCOPES = "pkg.torch.onnx.name_scopes"
_CLASSES = "pkg.torch.onnx.class_hierarchy"
_FX = "pkg.torch.onnx.fx_node"
#: Longest metadata value read (a module path list or a traced call is far shorter; longer is not trusted).
MAX_TEXT = 1 << 16
#: Longest graph signature read (a line per parameter and buffer).
MAX_SIGNATURE = 1 << 24

_TARGET = re.compile(r"^\s*(\w+): (PARAMETER|BUFFER) target='([\w.\-]{1,512})'", re.MULTILINE)
#: A module path as torch writes one (``model.layers.0.mlp``); anything else is not taken as a name.
_PATH = re.compile(r"[\w.\-]{1,512}")
_QUOTED = re.compile(r"'([^'\\]*)'")
_PLACEHOLDER = re.compile(r"%(\w+)")
_CALL = re.compile(r"\]\(args = (.*)$", re.DOTALL)


@dataclass(frozen=True)
class Origin:
    """Where a node came from: ``module`` (its module path, ``""`` for the root), ``module_class`` (that module's
    class), ``op`` (the traced ATen op, ``aten.linear.default``) and ``params`` (the state-dict names of the
    parameters and buffers its traced call reads, in argument order)."""

    module: str
    module_class: str
    op: str
    params: tuple[str, ...]

    def param(self, role: str) -> str | None:
        """The first parameter named ``*.{role}`` (``weight``, ``bias``), or None."""
        return next((p for p in self.params if p.rsplit(".", 1)[-1] == role), None)


def _listed(text: str) -> list[str] | None:
    """The strings of a Python list literal of plain strings (``['', 'model']``), or None."""
    text = text.strip()
    if len(text) > MAX_TEXT or not (text.startswith("[") and text.endswith("]")):
        return None
    return _QUOTED.findall(text)


def _targets(model: Any) -> dict[str, str]:
    props = [*model.graph.metadata_props, *model.metadata_props]  # torch 2.13 writes it on the graph
    text = next((p.value for p in props if p.key == SIGNATURE), "")
    if not isinstance(text, str) or len(text) > MAX_SIGNATURE:
        return {}
    return {m.group(1): m.group(3) for m in _TARGET.finditer(text)}


def read_origins(model: Any) -> dict[int, Origin] | None:
    """Each main-graph node's :class:`Origin` by index, for nodes that carry the exporter's module scopes;
    None when the model has no graph signature (not a dynamo export, or its metadata was stripped)."""
    targets = _targets(model)
    if not targets:
        return None
    found: dict[int, Origin] = {}
    for i, node in enumerate(model.graph.node):
        props = {p.key: p.value for p in node.metadata_props if p.key in (_SCOPES, _CLASSES, _FX)}
        scopes = _listed(props.get(_SCOPES, ""))
        classes = _listed(props.get(_CLASSES, "")) or []
        if not scopes or len(scopes) < 2:
            continue
        call = _CALL.search(props.get(_FX, "")[:MAX_TEXT])
        params = tuple(targets[p] for p in _PLACEHOLDER.findall(call.group(1)) if p in targets) if call else ()
        if not _PATH.fullmatch(scopes[-2]):
            continue
        module_class = classes[-2] if len(classes) >= 2 else ""
        found[i] = Origin(scopes[-2], module_class, classes[-1] if classes else "", params)
    return found

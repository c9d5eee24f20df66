"""The owner's side of Greedy Residuals: sign, pick layers, add the penalty, write the bundle.

A plain PyTorch loop needs four lines::

    wm = GreedyResidualsWatermark.create(model, private_key=key, message="(c) 2025 Alice")
    loss = F.cross_entropy(model(x), y) + wm.penalty(model)      # every step
    wm.check(model).require()                                     # would the detector find it?
    wm.save_bundle(out / "owner_bundle.json", model, model_file=out / "model.safetensors")

The object keeps the signature, the public key and the signature bits, never
the private key, and the bundle it writes holds nothing secret.
"""

from __future__ import annotations

import base64
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from auditor.errors import UsageError
from auditor.plugins.greedy_residuals import stats
from auditor.plugins.greedy_residuals.scheme import (
    SCHEME,
    GRParams,
    alpha_from_signature,
    match_bits,
    penalty_term,
    residuals,
)

__all__ = ["GreedyResidualsWatermark", "MarkedLayer", "bits_needed", "default_layers", "marked_layer"]

#: The spec's parameters (the authors' experiments).
DEFAULT_PARAMS = GRParams()
#: How many layers the default rule marks at most.
MAX_DEFAULT_LAYERS = 3

_KINDS: tuple[tuple[type[nn.Module], str], ...] = (
    (nn.Conv1d, "conv1d"),
    (nn.Conv2d, "conv2d"),
    (nn.Linear, "linear"),
    (nn.LSTM, "lstm"),
    (nn.GRU, "gru"),
)


def _kind(module: nn.Module) -> str | None:
    kind = next((kind for cls, kind in _KINDS if isinstance(module, cls)), None)
    if kind is None and _transposed_linear(module):
        return "linear"
    return kind


def _transposed_linear(module: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2's attention and MLP layers): a linear layer that stores its weight as
    ``(in, out)``; recognised by name and shape, so that ``transformers`` is never imported here. The weight
    is marked as stored, which is also how a file of such a model holds it."""
    weight = getattr(module, "weight", None)
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and isinstance(weight, torch.Tensor) \
        and weight.ndim == 2


def _weight_names(module: nn.Module) -> list[str]:
    """The weight matrices a module of a supported kind owns (never biases)."""
    return [name for name, p in module.named_parameters(recurse=False) if name.startswith("weight") and p.ndim >= 2]


@dataclass(frozen=True)
class MarkedLayer:
    """One parameter that carries the signature, as the bundle describes it."""

    name: str  # module path, "conv2"
    param: str  # "weight", "weight_hh_l0"
    kind: str  # "conv2d", "conv1d", "linear", "lstm", "gru"
    shape: tuple[int, ...]
    kind_index: int  # position among the model's modules of this kind, in module order

    @property
    def qualified(self) -> str:
        """The parameter's name in ``named_parameters``/the state dict: ``conv2.weight``."""
        return f"{self.name}.{self.param}" if self.name else self.param


def _modules_by_kind(model: nn.Module) -> list[tuple[str, nn.Module, str, int]]:
    """(path, module, kind, kind_index) of every supported module, in module order."""
    counts: dict[str, int] = {}
    found = []
    for path, module in model.named_modules():
        kind = _kind(module)
        if kind is None or not _weight_names(module):
            continue
        found.append((path, module, kind, counts.get(kind, 0)))
        counts[kind] = counts.get(kind, 0) + 1
    return found


def followed_by_batch_norm(model: nn.Module, path: str) -> bool:
    """Whether the next parameterised module after ``path`` (in registration order) is a
    batch-norm over its output channels.

    Registration order is the usual conv-then-norm order of a block; the
    detector uses this to tell an ONNX export that folded the norm in.
    """
    modules = [(p, m) for p, m in model.named_modules() if any(True for _ in m.parameters(recurse=False))]
    for i, (mpath, module) in enumerate(modules):
        if mpath == path:
            if i + 1 == len(modules):
                return False
            nxt = modules[i + 1][1]
            out = getattr(module, "out_channels", getattr(module, "out_features", None))
            return isinstance(nxt, nn.modules.batchnorm._BatchNorm) and nxt.num_features == out
    return False


def marked_layer(model: nn.Module, qualified: str) -> MarkedLayer:
    """Describe parameter ``qualified`` (``conv2.weight``) of ``model`` for the bundle.

    Raises :class:`~auditor.errors.UsageError` unless it is a weight matrix of a
    conv, linear, LSTM or GRU module.
    """
    path, _, param = qualified.rpartition(".")
    for mpath, module, kind, index in _modules_by_kind(model):
        if mpath == path and param in _weight_names(module):
            return MarkedLayer(mpath, param, kind, tuple(getattr(module, param).shape), index)
    candidates = [f"{p}.{w}" if p else w for p, m, _, _ in _modules_by_kind(model) for w in _weight_names(m)]
    shown = ", ".join(candidates[:20]) + (", ..." if len(candidates) > 20 else "")
    raise UsageError(
        f"{qualified!r} is not a weight of a conv, linear, LSTM or GRU layer of this model; candidates: {shown}"
    )


def bits_needed(bits: int, layers: int, p_threshold: float | None = None) -> int:
    """The fewest of ``bits`` signature bits one layer must match for the detector to report a
    detection at ``p_threshold`` (its default when ``None``) with ``layers`` layers tried: the
    smallest k whose two-sided binomial p-value times ``layers`` (Bonferroni) is below the threshold.
    ``bits + 1`` when even every bit would not do."""
    from auditor.plugins.greedy_residuals.detector import DEFAULT_P_THRESHOLD

    threshold = DEFAULT_P_THRESHOLD if p_threshold is None else p_threshold
    if not 0.0 < threshold < 1.0:
        raise UsageError(f"the p-value threshold must be between 0 and 1, not {threshold}")
    bar = math.log10(threshold) - math.log10(max(layers, 1))
    return next((k for k in range(bits // 2, bits + 1) if stats.two_sided_p(k, bits).log10 < bar), bits + 1)


def default_layers(model: nn.Module, params: GRParams = DEFAULT_PARAMS) -> list[str]:
    """The parameters the watermark goes into when the owner names none.

    Candidates are the weight matrices of conv, linear (transformers' ``Conv1D`` too), LSTM and GRU modules
    (for a recurrent module its largest weight matrix; never biases, norms or
    embeddings), except the last such module in module order: the classifier
    head, which fine-tuning replaces. Keep the candidates with at least
    ``params.bits`` weights; if more than three remain, the three largest
    (ties go to the earlier module); if none remain, the largest candidate.
    The result is in module order. A model whose only layer is its head gets
    the head. Raises :class:`~auditor.errors.UsageError` for a model with no
    supported layer at all.
    """
    modules = _modules_by_kind(model)
    if not modules:
        raise UsageError("the model has no conv, linear, LSTM or GRU layer to carry a watermark")
    candidates: list[tuple[int, int, str]] = []  # (order, size, qualified)
    for order, (path, module, _, _) in enumerate(modules):
        # max() keeps the first of equal sizes: weight_ih before weight_hh, layer 0 before layer 1.
        param = max(_weight_names(module), key=lambda w: getattr(module, w).numel())
        candidates.append((order, getattr(module, param).numel(), f"{path}.{param}" if path else param))
    body = candidates[:-1] or candidates
    kept = [c for c in body if c[1] >= params.bits]
    if not kept:
        kept = [max(body, key=lambda c: (c[1], -c[0]))]
    kept = sorted(kept, key=lambda c: (-c[1], c[0]))[:MAX_DEFAULT_LAYERS]
    return [name for _, _, name in sorted(kept)]


class GreedyResidualsWatermark:
    """An owner's Greedy Residuals watermark: signature, signature bits and the marked layers.

    Build it with :meth:`create`; add :meth:`penalty` to the loss on every
    training step; check with :meth:`rates`; write the evidence with
    :meth:`save_bundle`.
    """

    def __init__(
        self,
        *,
        message: str,
        signature: bytes,
        signature_algorithm: str,
        public_key_pem: str,
        layers: Sequence[MarkedLayer],
        params: GRParams,
    ) -> None:
        self.message = message
        self.signature = signature
        self.signature_algorithm = signature_algorithm
        self.public_key_pem = public_key_pem
        self.layers = list(layers)
        self.params = params
        self.alpha = alpha_from_signature(signature, params.bits)

    @classmethod
    def create(
        cls,
        model: nn.Module,
        *,
        private_key: Any,
        message: str,
        layers: Sequence[str] | None = None,
        params: GRParams = DEFAULT_PARAMS,
    ) -> GreedyResidualsWatermark:
        """Sign ``message`` (UTF-8) with ``private_key`` and choose the layers to mark.

        ``layers`` are parameter names (``conv2.weight``, ``lstm.weight_hh_l0``);
        ``None`` applies :func:`default_layers`. The private key is used for the
        signature and not kept.
        """
        from auditor import keys

        if not message:
            raise UsageError("the copyright message is empty")
        names = default_layers(model, params) if layers is None else list(dict.fromkeys(layers))
        if not names:
            raise UsageError("no layers to mark")
        marked = [marked_layer(model, name) for name in names]
        signature = keys.sign(private_key, message.encode("utf-8"))
        return cls(
            message=message,
            signature=signature,
            signature_algorithm=keys.signature_algorithm(private_key),
            public_key_pem=keys.public_pem(private_key),
            layers=marked,
            params=params,
        )

    @property
    def layer_names(self) -> list[str]:
        """The marked parameters' names, in module order."""
        return [layer.qualified for layer in self.layers]

    def penalty(self, model: nn.Module) -> torch.Tensor:
        """The embedding term E: the sum over marked layers of
        lambda * sum_i ReLU(mu - alpha_i * psi_i). Add it to the task loss."""
        terms = [penalty_term(model.get_parameter(name), self.alpha, self.params) for name in self.layer_names]
        return torch.stack(terms).sum()

    @torch.no_grad()
    def rates(self, model: nn.Module) -> dict[str, float]:
        """Per marked parameter, the fraction of signature bits its residual signs match."""
        return {
            name: match_bits(residuals(model.get_parameter(name).detach(), self.params), self.alpha) / self.params.bits
            for name in self.layer_names
        }

    @torch.no_grad()
    def check(self, model: nn.Module, *, min_bits: int | None = None, p_threshold: float | None = None) -> Any:
        """Measure the watermark in ``model`` as the detector will: per marked layer, how many
        signature bits its residual signs match, against the bits the detector needs at
        ``p_threshold`` (:func:`bits_needed`, Bonferroni over the marked layers).

        Every marked layer must reach ``min_bits`` (default: what the detector needs), since each
        is meant to carry the signature on its own. Returns a
        :class:`~auditor.toolkit.training.EmbeddingCheck`; its ``require()`` raises when one falls short.
        """
        from auditor.toolkit.training import EmbeddingCheck

        b = self.params.bits
        needed = bits_needed(b, len(self.layers), p_threshold)
        bar = needed if min_bits is None else int(min_bits)
        counts = {
            name: match_bits(residuals(model.get_parameter(name).detach(), self.params), self.alpha)
            for name in self.layer_names
        }
        threshold = _default_threshold() if p_threshold is None else p_threshold
        n = len(self.layers)
        why = (
            f"the detector needs (p < {threshold:g}, {n} marked layer{'s' * (n != 1)})"
            if bar == needed
            else "that --min-bits asks for"
        )
        shortfalls = [f"{name} carries {k}/{b} signature bits, below the {bar} {why}" for name, k in counts.items()
                      if k < bar]  # fmt: skip
        relax = (
            f"train longer (more --epochs), raise --lr, or accept it with --min-bits {min(counts.values())}"
            if shortfalls
            else ""
        )
        measures = {
            "layers": {name: {"bits": k, "of": b} for name, k in counts.items()},
            "bits_needed": needed,
            "min_bits": bar,
        }
        return EmbeddingCheck("greedy-residuals", measures, shortfalls, relax)

    def payload(
        self,
        model: nn.Module,
        *,
        model_file: Path,
        architecture: str | None = None,
        training: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """The owner-bundle payload for the released ``model`` saved as ``model_file``.

        Each marked layer is recorded under the name ``model_file`` holds it by, where that differs from
        its module name (:func:`~auditor.toolkit.saved_names.names_in_file`: a ``transformers`` ViT saved by
        ``save_pretrained``), so that the detector finds it in the released file by name.

        ``architecture`` names the built-in architecture (or the owner's
        factory), ``training`` optionally records how the model was trained
        (data set, test split hash, accuracy); neither is needed to detect.
        """
        from auditor.safeio import sha256_file
        from auditor.toolkit.saved_names import names_in_file, saved_layer

        model_file = Path(model_file)
        rates = self.rates(model)
        # The names the released file gives the marked tensors (transformers' save_pretrained may rename them).
        saved = names_in_file({q: model.get_parameter(q) for q in self.layer_names}, model_file)
        where = {layer.qualified: saved_layer(saved[layer.qualified], layer.name, layer.param) for layer in self.layers}
        payload: dict[str, Any] = {
            "params": self.params.to_dict(),
            "message": self.message,
            "signature": base64.b64encode(self.signature).decode("ascii"),
            "signature_algorithm": self.signature_algorithm,
            "public_key": self.public_key_pem,
            "layers": [
                {
                    "name": where[layer.qualified][0],
                    "param": where[layer.qualified][1],
                    "kind": layer.kind,
                    "shape": list(layer.shape),
                    "kind_index": layer.kind_index,
                    "release_rate": rates[layer.qualified],
                    "batch_norm": followed_by_batch_norm(model, layer.name),
                }
                for layer in self.layers
            ],
            "model": {
                "sha256": sha256_file(model_file),
                "file": model_file.name,
                "parameters": sum(p.numel() for p in model.parameters()),
                "architecture": architecture,
            },
        }
        if training is not None:
            payload["training"] = training
        return payload

    def save_bundle(
        self,
        path: Path,
        model: nn.Module,
        *,
        model_file: Path,
        architecture: str | None = None,
        training: dict[str, Any] | None = None,
    ) -> str:
        """Write the owner bundle (scheme ``greedy-residuals``) to ``path``; return its SHA-256."""
        from auditor.bundle import save_bundle

        payload = self.payload(model, model_file=model_file, architecture=architecture, training=training)
        return save_bundle(Path(path), scheme=SCHEME, payload=payload, secret=False)


def _default_threshold() -> float:
    from auditor.plugins.greedy_residuals.detector import DEFAULT_P_THRESHOLD

    return DEFAULT_P_THRESHOLD

"""The owner's side of HufuNet: choose the host layers, place EPH, train with it frozen, write the bundle.

The host's kernels are numbered over :func:`host_layers`, which the owner
bundle records in that order (layer name, parameter, kind, shape, order among
layers of its kind, kernel count). The detector rebuilds the same numbering
from those records in any suspect file, whatever order the file keeps its
tensors in, so the positions it recomputes point at the same weights.

In the owner's own loop::

    net, secret = load_hufunet(Path("hufunet.json"))            # auditor hufunet generate
    embedded = plant(model, net, hmac_key(secret))              # EPH written and frozen
    ... train, calling embedded.frozen.after_step(model) after every optimiser step ...
    embedded.frozen.detach()
    embedded.check(model, net, secret).require()                # EPH bit-identical, Acc_combined
    files = save_model(model, out)                              # auditor.toolkit.training
    write_bundle(out / "owner_bundle.json", model, embedded, net, secret, files=files, architecture="mine")

The owner bundle (scheme ``hufunet``) is SECRET: it holds the whole HufuNet
(EPH and SPH) and the placement key, which is what verification needs. It is
written with mode 0600 and must reach only the analyst.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from auditor.errors import UsageError
from auditor.plugins.hufunet.freezing import FrozenKernels
from auditor.plugins.hufunet.generate import generate_hufunet, hmac_key, load_hufunet
from auditor.plugins.hufunet.placement import HostView, eph_kernels, host_kernel_count, host_refs, place
from auditor.plugins.hufunet.scheme import SCHEME, public_dataset
from auditor.toolkit.models import model_graph

if TYPE_CHECKING:
    from auditor.toolkit.training import EmbeddingCheck

__all__ = [
    "BUNDLE_FILE",
    "MODEL_STEM",
    "SCHEME",
    "SECRET_FIELDS",
    "EmbeddedHufuNet",
    "FrozenKernels",
    "generate_hufunet",
    "hmac_key",
    "host_layers",
    "kernel_total",
    "host_view",
    "load_hufunet",
    "model_graph",
    "plant",
    "write_bundle",
]

BUNDLE_FILE = "owner_bundle.json"
MODEL_STEM = "model"
#: The fields of the secret HufuNet file copied into the owner bundle's ``hufunet`` section.
SECRET_FIELDS = ("widths", "in_channels", "num_classes", "eph", "sph", "hmac_key", "dataset", "acc_original")


def host_layers(model: nn.Module, names: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """The host tensors of ``model`` as the bundle records them, in kernel-numbering order.

    By default every 3x3 convolution; a model without one offers its linear and
    LSTM/GRU weight matrices as groups of nine (see
    :func:`~auditor.plugins.hufunet.placement.host_refs`). ``names`` picks layers.
    """
    graph = model_graph(model)
    rows = []
    for layer, role, ref in host_refs(graph, names):
        same_kind = graph.of_kind(layer.kind)
        rows.append(
            {
                "name": layer.name,
                "param": role,
                "kind": layer.kind.value,
                "shape": list(ref.shape),
                "kind_index": next(i for i, other in enumerate(same_kind) if other.name == layer.name),
                "kernels": host_kernel_count([ref.shape]),
            }
        )
    return rows


def _qualified(entry: dict[str, Any]) -> str:
    return f"{entry['name']}.{entry['param']}" if entry["name"] else str(entry["param"])


def host_view(model: nn.Module, entries: Sequence[dict[str, Any]]) -> HostView:
    """A view of the model's own parameters (not copies) in the entries' order."""
    params = dict(model.named_parameters())
    missing = [_qualified(e) for e in entries if _qualified(e) not in params]
    if missing:
        raise UsageError(f"the host has no parameter {', '.join(missing)}")
    return HostView.from_tensors([(_qualified(e), params[_qualified(e)].data) for e in entries])


class EmbeddedHufuNet:
    """EPH placed in a host model and frozen there: what :func:`plant` returns.

    ``frozen`` is a :class:`~auditor.plugins.hufunet.freezing.FrozenKernels`
    already attached (EPH written, gradients masked); pass ``frozen.after_step``
    to the training loop and call ``frozen.detach()`` after it.
    """

    def __init__(self, entries: list[dict[str, Any]], positions: list[int], frozen: FrozenKernels, n: int) -> None:
        self.entries = entries
        self.positions = positions
        self.frozen = frozen
        self.n = n

    @property
    def eph_fraction(self) -> float:
        """EPH kernels as a fraction of the host's kernels."""
        return len(self.positions) / self.n

    @torch.no_grad()
    def measure(self, model: nn.Module, hufunet: nn.Module, secret: Mapping[str, Any]) -> dict[str, float]:
        """What the detector will measure in ``model``'s current weights: the share of EPH weights
        found bit for bit at the keyed positions (``bit_identical_fraction``), and the accuracy of
        HufuNet rebuilt from them with the SPH on the public test split (``acc_combined``)."""
        from auditor.plugins.hufunet.network import accuracy, assemble, sph_of
        from auditor.plugins.hufunet.placement import retrieve

        convs = [m.weight for m in hufunet.modules() if isinstance(m, nn.Conv2d)]
        eph = eph_kernels(convs).detach().cpu().to(torch.float32)
        read_back = retrieve(host_view(model, self.entries), self.positions).detach().cpu().to(torch.float32)
        same = (read_back.contiguous().view(torch.int32) == eph.contiguous().view(torch.int32)).float().mean()
        widths = [int(w.shape[0]) for w in convs]
        combined = assemble(read_back, sph_of(hufunet), widths, int(convs[0].shape[1]))  # type: ignore[arg-type]
        return {
            "bit_identical_fraction": float(same),
            "acc_combined": accuracy(combined, public_dataset(secret["dataset"])),
            "acc_original": float(secret["acc_original"]),
        }

    def check(
        self,
        model: nn.Module,
        hufunet: nn.Module,
        secret: Mapping[str, Any],
        *,
        min_acc_combined: float | None = None,
        min_identical: float = 1.0,
    ) -> EmbeddingCheck:
        """Measure (:meth:`measure`) and compare with what the detector needs: every EPH weight
        bit-identical (``min_identical``), and Acc_combined above ``min_acc_combined`` (default: the
        detector's bar, Acc_original x (1 - tau_acc), DiffAcc < tau_acc = 0.15). Returns an
        :class:`~auditor.toolkit.training.EmbeddingCheck`; its ``require()`` raises when one falls short."""
        from auditor.plugins.hufunet.detector import TAU_ACC
        from auditor.toolkit.training import EmbeddingCheck

        m = self.measure(model, hufunet, secret)
        needed = m["acc_original"] * (1.0 - TAU_ACC)
        shortfalls = []
        if m["bit_identical_fraction"] < min_identical:
            shortfalls.append(
                f"only {m['bit_identical_fraction']:.2%} of the EPH weights are bit-identical at the keyed positions "
                "(call frozen.after_step after every optimiser step; keep the host's weights float32)"
            )
        if min_acc_combined is None and not m["acc_combined"] > needed:
            shortfalls.append(
                f"Acc_combined is {m['acc_combined']:.2%}, not above the {needed:.2%} the detector needs "
                f"(DiffAcc < {TAU_ACC} of Acc_original {m['acc_original']:.2%})"
            )
        elif min_acc_combined is not None and m["acc_combined"] < min_acc_combined:
            shortfalls.append(f"Acc_combined is {m['acc_combined']:.2%}, below --min-acc-combined {min_acc_combined}")
        relax = f"accept it with --min-acc-combined {m['acc_combined']:.4f}" if shortfalls else ""
        measures = {**m, "acc_combined_needed": needed if min_acc_combined is None else min_acc_combined}
        return EmbeddingCheck("hufunet", measures, shortfalls, relax)


def plant(model: nn.Module, hufunet: nn.Module, key: bytes, *, layers: Sequence[str] | None = None) -> EmbeddedHufuNet:
    """Place the HufuNet's EPH in ``model`` (paper Algorithm 1) and freeze it there.

    Positions come from the HufuNet's own (original) EPH values, the key and
    the host's kernel count N; a host too small for EPH is refused with the
    size it would need.
    """
    convs = [m.weight for m in hufunet.modules() if isinstance(m, nn.Conv2d)]
    eph = eph_kernels(convs)
    entries = host_layers(model, layers)
    view = host_view(model, entries)
    positions = place(eph, key, view.n)
    frozen = FrozenKernels.for_host(model, view, positions, eph).attach()
    return EmbeddedHufuNet(entries, positions, frozen, view.n)


def kernel_total(entries: Sequence[dict[str, Any]]) -> int:
    """N as the entries record it (the sum of their kernel counts)."""
    return sum(int(e["kernels"]) for e in entries)


def _as_saved(model: nn.Module, entries: Sequence[dict[str, Any]], model_file: Path) -> list[dict[str, Any]]:
    """The host entries under the names ``model_file`` gives their tensors (order and all else kept)."""
    from auditor.toolkit.saved_names import names_in_file, saved_layer

    params = dict(model.named_parameters())
    saved = names_in_file({_qualified(e): params[_qualified(e)] for e in entries}, model_file)
    renamed = []
    for entry in entries:
        name, param = saved_layer(saved[_qualified(entry)], str(entry["name"]), str(entry["param"]))
        renamed.append({**entry, "name": name, "param": param})
    return renamed


def write_bundle(
    path: Path,
    model: nn.Module,
    embedded: EmbeddedHufuNet,
    hufunet: nn.Module,
    secret: Mapping[str, Any],
    *,
    files: Mapping[str, Path],
    architecture: str,
    width: int | None = None,
    training: Mapping[str, Any] | None = None,
) -> tuple[str, dict[str, Any]]:
    """Write the SECRET owner bundle (scheme ``hufunet``, mode 0600) for a trained host; return
    its SHA-256 and payload.

    ``files`` are the released model's files (``safetensors`` and ``pt``, as
    :func:`~auditor.toolkit.training.save_model` returns them); ``secret`` is
    the secret HufuNet file's payload. EPH is read back from the trained
    ``model`` at the keyed positions to record Acc_combined at release, and
    must come back bit-identical. Each host layer is recorded under the name
    the released file holds it by, where that differs from its module name
    (:func:`~auditor.toolkit.saved_names.names_in_file`: a ``transformers``
    ViT saved by ``save_pretrained``), in the same kernel-numbering order.
    """
    from auditor.bundle import save_bundle
    from auditor.safeio import sha256_file

    measured = embedded.measure(model, hufunet, secret)
    if measured["bit_identical_fraction"] < 1.0:
        raise UsageError(
            f"only {measured['bit_identical_fraction']:.2%} of the EPH weights are bit-identical in the trained "
            "model: the freezing was broken (call frozen.after_step after every optimiser step); no bundle written"
        )
    acc_combined = measured["acc_combined"]
    entries = _as_saved(model, embedded.entries, Path(files["safetensors"]))
    released = {"file": Path(files["safetensors"]).name, "sha256": sha256_file(Path(files["safetensors"]))}
    if "pt" in files:
        released.update(pt_file=Path(files["pt"]).name, pt_sha256=sha256_file(Path(files["pt"])))
    payload: dict[str, Any] = {
        "hufunet": {name: secret[name] for name in SECRET_FIELDS},
        "host": {
            "architecture": architecture, "width": width, "layers": entries, "kernels": embedded.n,
            "eph_kernels": len(embedded.positions), "eph_fraction": embedded.eph_fraction,
        },
        "model": released,
        "training": dict(training or {}),
        "release": {"acc_combined": acc_combined, "bit_identical_fraction": 1.0},
    }  # fmt: skip
    return save_bundle(Path(path), scheme=SCHEME, payload=payload, secret=True), payload

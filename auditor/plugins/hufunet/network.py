"""The HufuNet network: five 3x3 convolutions (the EPH) and one fully connected layer (the SPH).

The authors' network (docs/design/hufunet.md) has widths 32, 64, 128, 128, 64;
here the widths and input channels are arguments. Max-pooling follows conv2 and
conv3 and a global average pool follows conv5, so both the bundled 8x8 digits
(8 -> 4 -> 2) and 28x28 Fashion-MNIST (28 -> 14 -> 7) fit. The convolutions
have no bias and no normalisation: every weight the network needs besides the
fully connected layer is a 3x3 kernel, so the whole network is rebuilt from
the retrieved kernels and the owner's SPH.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from auditor.errors import UsageError

__all__ = [
    "DIGITS_WIDTHS",
    "MAX_WIDTH",
    "PAPER_WIDTHS",
    "POOL_AFTER",
    "HufuNet",
    "accuracy",
    "assemble",
    "eph_count",
    "eph_of",
    "sph_of",
]

DIGITS_WIDTHS: tuple[int, ...] = (4, 8, 16, 16, 8)
"""Default widths: 4 + 32 + 128 + 256 + 128 = 548 EPH kernels for one input channel, so a
host of 2,192 3x3 kernels or more carries it at <= 25%; it reaches ~96-98% on digits."""

PAPER_WIDTHS: tuple[int, ...] = (32, 64, 128, 128, 64)
"""The authors' widths (their HufuNet for Fashion-MNIST)."""

POOL_AFTER: tuple[int, ...] = (1, 2)
"""0-based indices of the convolutions followed by 2x2 max-pooling (conv2 and conv3)."""

MAX_WIDTH = 4096
"""Widest convolution accepted (a bound for networks rebuilt from a file)."""

MAX_IN_CHANNELS = 16
MAX_CLASSES = 10_000


def check_shape(widths: Sequence[int], in_channels: int, num_classes: int) -> tuple[int, ...]:
    """``widths`` as a tuple after checking the network these arguments describe is a HufuNet.

    Raises :class:`~auditor.errors.UsageError` unless there are five widths in
    1..:data:`MAX_WIDTH`, 1..16 input channels and 2..10,000 classes.
    """
    w = tuple(widths)
    if len(w) != 5 or not all(isinstance(x, int) and not isinstance(x, bool) and 1 <= x <= MAX_WIDTH for x in w):
        raise UsageError(f"HufuNet needs five convolution widths between 1 and {MAX_WIDTH}, not {list(w)}")
    if isinstance(in_channels, bool) or not isinstance(in_channels, int) or not 1 <= in_channels <= MAX_IN_CHANNELS:
        raise UsageError(f"HufuNet input channels must be between 1 and {MAX_IN_CHANNELS}, not {in_channels!r}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or not 2 <= num_classes <= MAX_CLASSES:
        raise UsageError(f"HufuNet classes must be between 2 and {MAX_CLASSES}, not {num_classes!r}")
    return w


def eph_count(widths: Sequence[int], in_channels: int = 1) -> int:
    """Number of 3x3 kernels (K) in the EPH of a HufuNet of these widths."""
    chans = (in_channels, *widths)
    return sum(a * b for a, b in itertools.pairwise(chans))


class HufuNet(nn.Module):
    """Five bias-free 3x3 convolutions with ReLU (``convs``), max-pooling after conv2 and
    conv3, global average pooling, and one fully connected layer with bias (``fc``).

    ``kernel_dropout`` is the chance that a 3x3 kernel is zeroed in a training step (the
    kept ones scaled up to match); it does nothing in evaluation. A network trained so
    tolerates kernels lost from the host: a cut-off channel comes back from restore as zero
    kernels, and pruning zeroes weights (docs/hufunet.md, "Kernel dropout")."""

    def __init__(
        self,
        widths: Sequence[int] = DIGITS_WIDTHS,
        *,
        in_channels: int = 1,
        num_classes: int = 10,
        kernel_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.widths = check_shape(widths, in_channels, num_classes)
        if not 0.0 <= kernel_dropout < 1.0:
            raise UsageError(f"kernel dropout must be in [0, 1), not {kernel_dropout}")
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.kernel_dropout = kernel_dropout
        chans = (in_channels, *self.widths)
        self.convs = nn.ModuleList(nn.Conv2d(a, b, 3, padding=1, bias=False) for a, b in itertools.pairwise(chans))
        self.fc = nn.Linear(self.widths[-1], num_classes)

    def conv_layers(self) -> list[nn.Conv2d]:
        """The five convolutions, typed (``convs`` is a plain ModuleList)."""
        return [conv for conv in self.convs if isinstance(conv, nn.Conv2d)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits of a batch ``(B, in_channels, H, W)``; H and W at least 4."""
        for i, conv in enumerate(self.conv_layers()):
            weight = conv.weight
            if self.training and self.kernel_dropout > 0:
                keep = torch.rand(weight.shape[:2], device=weight.device) >= self.kernel_dropout
                weight = weight * (keep.to(weight.dtype) / (1.0 - self.kernel_dropout))[..., None, None]
            x = F.relu(F.conv2d(x, weight, padding=1))
            if i in POOL_AFTER:
                x = F.max_pool2d(x, 2)
        return self.fc(x.mean(dim=(2, 3)))


def eph_of(net: HufuNet) -> list[torch.Tensor]:
    """The EPH: the five convolution weights ``(out, in, 3, 3)``, detached, in layer order."""
    return [conv.weight.detach() for conv in net.conv_layers()]


def sph_of(net: HufuNet) -> dict[str, torch.Tensor]:
    """The SPH: the fully connected layer's ``weight`` and ``bias``, detached."""
    return {"weight": net.fc.weight.detach(), "bias": net.fc.bias.detach()}


def assemble(
    eph_kernels: torch.Tensor, sph: Mapping[str, torch.Tensor], widths: Sequence[int], in_channels: int = 1
) -> HufuNet:
    """A HufuNet rebuilt from ``(K, 3, 3)`` kernels (layer order, out-major then in, as
    :func:`~auditor.plugins.hufunet.placement.eph_kernels` gives them) and an SPH.

    The number of classes is read from the SPH. Raises
    :class:`~auditor.errors.UsageError` when K or the SPH's shapes do not fit ``widths``.
    """
    weight, bias = sph.get("weight"), sph.get("bias")
    if weight is None or bias is None or weight.dim() != 2 or bias.dim() != 1:
        raise UsageError("the SPH must hold a 2-d 'weight' and a 1-d 'bias'")
    net = HufuNet(widths, in_channels=in_channels, num_classes=int(weight.shape[0]))
    expected = eph_count(net.widths, in_channels)
    if tuple(eph_kernels.shape) != (expected, 3, 3):
        raise UsageError(
            f"HufuNet of widths {list(net.widths)} needs {expected} EPH kernels of 3x3, "
            f"got a tensor of shape {tuple(eph_kernels.shape)}"
        )
    if tuple(weight.shape) != tuple(net.fc.weight.shape) or tuple(bias.shape) != tuple(net.fc.bias.shape):
        raise UsageError(
            f"the SPH has shapes {tuple(weight.shape)} and {tuple(bias.shape)}; "
            f"this HufuNet needs {tuple(net.fc.weight.shape)} and {tuple(net.fc.bias.shape)}"
        )
    kernels = eph_kernels.detach().to("cpu", torch.float32)
    start = 0
    with torch.no_grad():
        for conv in net.conv_layers():
            w = conv.weight
            count = w.shape[0] * w.shape[1]
            w.copy_(kernels[start : start + count].reshape(w.shape))
            start += count
        net.fc.weight.copy_(weight.detach().to(torch.float32))
        net.fc.bias.copy_(bias.detach().to(torch.float32))
    return net


def accuracy(net: nn.Module, dataset: object) -> float:
    """Top-1 accuracy of ``net`` on a :class:`~auditor.toolkit.data.Dataset`'s test split
    (or on a ``TensorDataset`` of ``(inputs, labels)``), a fraction in [0, 1], on the CPU."""
    from auditor.toolkit import training

    data = dataset if isinstance(dataset, TensorDataset) else getattr(dataset, "test", None)
    if not isinstance(data, TensorDataset):
        raise UsageError(f"accuracy needs a Dataset or a TensorDataset, not {type(dataset).__name__}")
    return training.evaluate(net, data, "cpu")

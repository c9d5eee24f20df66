"""Built-in architectures the embedders train when the owner brings no model of their own.

They are sized for the 8x8 digits (any input of at least 4x4 works) and every
layer an embedder would mark holds thousands of weights, so that a 256-bit
signature is spread over real weights rather than repeated copies of a few.
Modules are named attributes (``conv2``, ``layer2.conv1``, ``lstm``), so the
names in a saved state dict are readable in a report.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from auditor.errors import UsageError

if TYPE_CHECKING:
    from auditor.graph import LayerGraph

__all__ = [
    "ARCHITECTURES",
    "MAX_WIDTH",
    "BasicBlock",
    "RowLSTM",
    "SmallCNN",
    "SmallResNet",
    "build",
    "declared_input",
    "model_graph",
    "owner_model",
    "probe_input",
    "random_input",
]


#: Largest channel multiplier the built-ins accept (width 16 is a ResNet stage of 1,024 channels).
MAX_WIDTH = 16


def _check_width(width: int) -> int:
    if isinstance(width, bool) or not isinstance(width, int) or not 1 <= width <= MAX_WIDTH:
        raise UsageError(f"the width multiplier must be an integer from 1 to {MAX_WIDTH}, not {width!r}")
    return width


class SmallCNN(nn.Module):
    """Three conv+BN+ReLU blocks (16, 32, 64 channels, 3x3), two max-pools and a
    linear head on the flattened 64x2x2 features.

    Weights per layer: conv1 144, conv2 4,608, conv3 18,432, head 2,560.
    ``width`` multiplies every channel count (a wider host, with room for a watermark hidden in its kernels).
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 1) -> None:
        super().__init__()
        c1, c2, c3 = (16 * _check_width(width), 32 * width, 64 * width)
        self.conv1 = nn.Conv2d(in_channels, c1, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c1)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c2)
        self.conv3 = nn.Conv2d(c2, c3, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(c3)
        self.pool = nn.MaxPool2d(2)
        self.squeeze = nn.AdaptiveAvgPool2d(2)  # an identity on 8x8 input; other sizes still fit the head
        self.head = nn.Linear(c3 * 2 * 2, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits of a batch ``(N, C, H, W)``."""
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.pool(torch.relu(self.bn2(self.conv2(x))))
        x = self.pool(torch.relu(self.bn3(self.conv3(x))))
        return self.head(torch.flatten(self.squeeze(x), 1))


class BasicBlock(nn.Module):
    """The ResNet basic block: two 3x3 conv+BN, and a 1x1 conv+BN projection
    shortcut when the stride or width changes."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The block's output, same batch size."""
        y = torch.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return torch.relu(y + self.shortcut(x))


class SmallResNet(nn.Module):
    """A 3x3 stem (32 channels), two basic blocks (32 -> 32, then 32 -> 64 at
    stride 2 with a projection shortcut), global average pooling, a linear head.

    Weights per layer: stem 288, layer1 convs 9,216 each, layer2.conv1 18,432,
    layer2.conv2 36,864, layer2 shortcut 2,048, head 640. ``width`` multiplies every channel count.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 1) -> None:
        super().__init__()
        c1, c2 = 32 * _check_width(width), 64 * width
        self.stem = nn.Conv2d(in_channels, c1, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c1)
        self.layer1 = BasicBlock(c1, c1)
        self.layer2 = BasicBlock(c1, c2, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(c2, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits of a batch ``(N, C, H, W)``."""
        x = torch.relu(self.bn(self.stem(x)))
        x = self.layer2(self.layer1(x))
        return self.head(torch.flatten(self.pool(x), 1))


class RowLSTM(nn.Module):
    """Reads an image row by row (each row, all channels, is one time step):
    LSTM(C*W -> 64), then a linear head on the last hidden state.

    Weights on 8x8 digits: lstm.weight_ih_l0 2,048, lstm.weight_hh_l0 16,384, head 640.
    ``hidden`` defaults to ``64 * width``.
    """

    def __init__(
        self, num_classes: int = 10, in_channels: int = 1, row_width: int = 8, hidden: int | None = None, width: int = 1
    ) -> None:
        super().__init__()
        hidden = 64 * _check_width(width) if hidden is None else hidden
        self.lstm = nn.LSTM(in_channels * row_width, hidden, batch_first=True)
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits of a batch ``(N, C, H, W)``; ``C * W`` must equal the LSTM's input size."""
        n, c, h, w = x.shape
        rows = x.permute(0, 2, 1, 3).reshape(n, h, c * w)
        _, (h_last, _) = self.lstm(rows)
        return self.head(h_last[-1])


#: The built-in architectures by the name ``--arch`` takes.
ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {
    "cnn": SmallCNN,
    "resnet": SmallResNet,
    "lstm": RowLSTM,
}


def build(
    name: str, *, num_classes: int = 10, in_channels: int = 1, seed: int | None = None, **options: Any
) -> nn.Module:
    """A freshly initialised built-in architecture.

    ``options`` go to the architecture's constructor (``row_width=`` for
    ``lstm`` on inputs that are not 8 wide). ``seed``, if given, seeds torch's global generator first so the initial
    weights are reproducible. Raises :class:`~auditor.errors.UsageError` for
    an unknown ``name``.
    """
    try:
        factory = ARCHITECTURES[name]
    except KeyError:
        raise UsageError(f"unknown architecture {name!r}; known: {', '.join(sorted(ARCHITECTURES))}") from None
    if seed is not None:
        torch.manual_seed(seed)
    return factory(num_classes=num_classes, in_channels=in_channels, **options)


def owner_model(
    arch: str, *, model_factory: str | None = None, num_classes: int, input_shape: tuple[int, ...], width: int = 1
) -> tuple[nn.Module, str]:
    """The model an embedder trains and the name it is recorded under: the owner's own
    (``module:function`` returning an ``nn.Module``) or a built-in architecture sized for
    the data (``input_shape`` is ``(C, H, W)``). Seed torch's generator first."""
    if model_factory:
        from auditor.toolkit.data import load_factory

        model = load_factory(model_factory)()
        if not isinstance(model, nn.Module):
            raise UsageError(f"model factory {model_factory!r} returned {type(model).__name__}, not a torch nn.Module")
        return model, model_factory
    options: dict[str, Any] = {"row_width": input_shape[-1]} if arch == "lstm" else {}
    if width != 1:
        options["width"] = width
    return build(arch, num_classes=num_classes, in_channels=input_shape[0], **options), arch


def model_graph(model: nn.Module) -> LayerGraph:
    """The layer graph of an in-memory model, in module order, exactly as a loader
    would build it from the model's state dict (so kinds and layer names agree)."""
    from pathlib import Path

    from auditor.formats.statedict import graph_from_tensors
    from auditor.graph import TensorRef

    tensors = [(k, TensorRef.from_tensor(k, v.detach())) for k, v in model.state_dict().items()]
    return graph_from_tensors("model", Path("<in-memory model>"), tensors, files=[], order="module order")


#: The input this run's models take when they declare none (:func:`probe_input`): ``(shape, dtype)``.
_PROBE: ContextVar[tuple[tuple[int, ...], torch.dtype] | None] = ContextVar("auditor_probe_input", default=None)


def declared_input(model: nn.Module) -> tuple[tuple[int, ...], torch.dtype] | None:
    """The input an owner's model says it takes: one example's shape without the batch axis and its dtype.

    A model declares it with an ``input_shape`` attribute (``(4, 64)`` for a ``Conv1d`` over four
    channels of 64 steps) and, for anything but float32, an ``input_dtype`` (``torch.int64`` for
    token ids). Without one, the input :func:`probe_input` set for this run, if any; else ``None``.
    Raises :class:`~auditor.errors.UsageError` for a malformed declaration.
    """
    shape = getattr(model, "input_shape", None)
    if shape is None:
        return _PROBE.get()
    if not isinstance(shape, tuple | list) or not all(isinstance(s, int) and s > 0 for s in shape):
        raise UsageError(f"the model's input_shape must be a tuple of positive integers, not {shape!r}")
    dtype = getattr(model, "input_dtype", torch.float32)
    if not isinstance(dtype, torch.dtype):
        raise UsageError(f"the model's input_dtype must be a torch.dtype, not {dtype!r}")
    return tuple(shape), dtype


@contextmanager
def probe_input(shape: Sequence[int], dtype: torch.dtype = torch.float32) -> Iterator[None]:
    """Within the ``with``, a model that declares no input (:func:`declared_input`) is run on
    inputs of ``shape`` (no batch axis) and ``dtype``: what the owner's data factory gives.
    ``auditor evaluate`` sets it from the test split, so that the attacks it runs trace and
    export the owner's model on the owner's kind of input."""
    token = _PROBE.set((tuple(int(s) for s in shape), dtype))
    try:
        yield
    finally:
        _PROBE.reset(token)


def random_input(
    model: nn.Module, shape: Sequence[int], dtype: torch.dtype = torch.float32, *, count: int = 64, seed: int = 0
) -> torch.Tensor:
    """``count`` seeded random inputs of ``shape`` (no batch axis) and ``dtype`` for ``model``: standard normals
    for a float input, token ids below the smallest vocabulary of the model's embeddings for an integer one
    (what the attacks compare outputs on before they write a copy)."""
    generator = torch.Generator().manual_seed(seed)
    if dtype.is_floating_point:
        return torch.randn(count, *shape, generator=generator).to(dtype)
    vocab = min((m.num_embeddings for m in model.modules() if isinstance(m, nn.Embedding)), default=2)
    return torch.randint(0, max(1, vocab), (count, *shape), generator=generator, dtype=dtype)


class TinyViT(nn.Module):
    """The smallest ViT-style classifier for the 8x8 digits: the image cut into 4x4 patches (four tokens of 16
    pixels per channel), a linear patch embedding to ``dim`` (64), a class token and learned positions, ``depth``
    (2) pre-norm transformer blocks of single-head self-attention (separate ``q``, ``k``, ``v`` and ``proj``
    linear layers, so a state dict names them) and a ``4 * dim`` ReLU MLP (``fc1``, ``fc2``), a final layer
    norm and a linear head on the class token.

    Weights per layer at the defaults: patch 1,024, each of q/k/v/proj 4,096, fc1 and fc2 16,384, head 640.
    Not in :data:`ARCHITECTURES` (the embedders do not mark it); build it directly.
    """

    def __init__(
        self, num_classes: int = 10, in_channels: int = 1, *, patch: int = 4, dim: int = 64, depth: int = 2,
        image: int = 8,
    ) -> None:  # fmt: skip
        super().__init__()
        if image % patch:
            raise UsageError(f"the image side {image} is not a multiple of the patch side {patch}")
        self.patch_side = patch
        tokens = (image // patch) ** 2
        self.patch = nn.Linear(in_channels * patch * patch, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embedding = nn.Parameter(torch.randn(1, tokens + 1, dim) * 0.02)
        self.blocks = nn.ModuleList(_ViTBlock(dim) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits of a batch ``(N, C, H, W)``."""
        n, c, _, _ = x.shape
        p = self.patch_side
        patches = x.unfold(2, p, p).unfold(3, p, p).permute(0, 2, 3, 1, 4, 5).reshape(n, -1, c * p * p)
        h = torch.cat([self.cls_token.expand(n, -1, -1), self.patch(patches)], dim=1) + self.pos_embedding
        for block in self.blocks:
            h = block(h)
        return self.head(self.norm(h[:, 0]))


class _ViTBlock(nn.Module):
    """One pre-norm transformer block: single-head attention, then a ReLU MLP, each with a residual add."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.q, self.k, self.v, self.proj = (nn.Linear(dim, dim) for _ in range(4))
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.fc2 = nn.Linear(4 * dim, dim)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """The block's output, same shape as ``h`` ``(N, T, dim)``."""
        x = self.norm1(h)
        q, k, v = self.q(x), self.k(x), self.v(x)
        attention = torch.softmax(q @ k.transpose(1, 2) / q.shape[-1] ** 0.5, dim=-1)
        h = h + self.proj(attention @ v)
        return h + self.fc2(torch.relu(self.fc1(self.norm2(h))))

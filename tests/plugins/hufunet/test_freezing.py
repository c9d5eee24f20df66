"""EPH kernels stay bit-identical through host training with any optimiser, and leave no trace."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from auditor.errors import UsageError
from auditor.plugins.hufunet.freezing import FrozenKernels
from auditor.plugins.hufunet.placement import HostSlot, HostView, place, retrieve
from auditor.toolkit.training import TrainConfig, train

KEY = bytes(range(32))

Optimiser = Callable[[list[nn.Parameter]], torch.optim.Optimizer]
OPTIMISERS: dict[str, Optimiser] = {
    "sgd-momentum-wd": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=0.05),
    "adam": lambda p: torch.optim.Adam(p, lr=0.01, weight_decay=0.01),
    "adamw": lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.1),
}


class ConvHost(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv2(F.relu(self.conv1(x))))
        return self.fc(x.mean(dim=(2, 3)))


class RecurrentHost(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.LSTM(6, 12, batch_first=True)
        self.fc = nn.Linear(12, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x)
        return self.fc(out[:, -1])


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)


def _host_view(model: nn.Module, names: list[str]) -> HostView:
    params = dict(model.named_parameters())
    return HostView.from_tensors([(n, params[n].detach()) for n in names])


def _setup(kind: str) -> tuple[nn.Module, list[str], torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    if kind == "conv":
        model: nn.Module = ConvHost()
        names = ["conv1.weight", "conv2.weight"]  # 24 + 64 = 88 kernels
        x = torch.randn(16, 3, 6, 6)
    else:
        model = RecurrentHost()
        names = ["rnn.weight_ih_l0", "rnn.weight_hh_l0", "fc.weight"]  # 32 + 64 + 5 = 101 kernels
        x = torch.randn(16, 5, 6)
    eph = torch.randn(20, 3, 3, generator=torch.Generator().manual_seed(7))
    return model, names, eph, x


@pytest.mark.parametrize("kind", ["conv", "recurrent"])
@pytest.mark.parametrize("opt", sorted(OPTIMISERS))
def test_eph_bit_identical_through_training(kind: str, opt: str) -> None:
    model, names, eph, x = _setup(kind)
    plain_keys = list(type(model)().state_dict().keys())
    y = torch.randint(0, 4, (len(x),), generator=torch.Generator().manual_seed(3))
    host = _host_view(model, names)
    positions = place(eph, KEY, host.n)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = OPTIMISERS[opt](list(model.parameters()))
    with FrozenKernels.for_host(model, host, positions, eph) as frozen:
        assert frozen.attached and frozen.intact()
        embedded = {k: v.clone() for k, v in model.state_dict().items()}
        for _ in range(4):
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            for name, mask in host.masks(positions).items():
                grad = dict(model.named_parameters())[name].grad
                assert grad is not None and not grad[mask].any()
            optimizer.step()
            frozen.after_step(model)
    assert not frozen.attached
    assert frozen.intact()
    after = _host_view(model, names)
    assert torch.equal(_bits(retrieve(after, positions)), _bits(eph))
    # everything else trained
    masks = host.masks(positions)
    for name, value in model.state_dict().items():
        if name in masks:
            assert not torch.equal(value[~masks[name]], embedded[name][~masks[name]]), name
            assert not torch.equal(value, before[name])
    assert list(model.state_dict().keys()) == plain_keys
    assert not list(model.buffers())


def test_without_restore_weight_decay_moves_eph() -> None:
    # why restore() exists: zero gradients alone do not stop AdamW's decoupled weight decay
    model, names, eph, x = _setup("conv")
    host = _host_view(model, names)
    positions = place(eph, KEY, host.n)
    frozen = FrozenKernels.for_host(model, host, positions, eph).attach()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.1)
    optimizer.zero_grad()
    model(x).sum().backward()
    optimizer.step()
    assert not frozen.intact()
    frozen()  # callable as an after-step hook
    assert frozen.intact()
    frozen.detach()


def test_plugs_into_training_loop() -> None:
    model, names, eph, x = _setup("conv")
    y = torch.randint(0, 4, (len(x),), generator=torch.Generator().manual_seed(3))
    host = _host_view(model, names)
    positions = place(eph, KEY, host.n)
    with FrozenKernels.for_host(model, host, positions, eph) as frozen:
        result = train(
            model,
            TensorDataset(x, y),
            TrainConfig(epochs=2, batch_size=8, lr=0.01, optimizer="sgd", weight_decay=0.01),
            after_step=frozen.after_step,
        )
    assert result.steps == 4
    assert torch.equal(_bits(retrieve(_host_view(model, names), positions)), _bits(eph))


def test_detach_removes_hooks() -> None:
    model, names, eph, x = _setup("conv")
    host = _host_view(model, names)
    positions = place(eph, KEY, host.n)
    frozen = FrozenKernels.for_host(model, host, positions, eph)
    frozen.attach()
    frozen.detach()
    model(x).sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    masks = host.masks(positions)
    assert any(bool(grads[n][m].abs().sum() > 0) for n, m in masks.items())  # type: ignore[index]


def test_refusals() -> None:
    model, _, eph, _ = _setup("conv")
    with pytest.raises(UsageError, match="no parameter 'conv9.weight'"):
        FrozenKernels(model, [HostSlot("conv9", "weight", 0)], eph[:1])
    with pytest.raises(UsageError, match="no kernel starts at 216"):
        FrozenKernels(model, [HostSlot("conv1", "weight", 216)], eph[:1])
    with pytest.raises(UsageError, match="2 EPH kernels but 1 host slots"):
        FrozenKernels(model, [HostSlot("conv1", "weight", 0)], eph[:2])
    with pytest.raises(UsageError, match="overlap"):
        FrozenKernels(model, [HostSlot("conv1", "weight", 0), HostSlot("conv1", "weight", 4)], eph[:2])
    frozen = FrozenKernels(model, [HostSlot("conv1", "weight", 0)], eph[:1])
    with pytest.raises(UsageError, match="other than"):
        frozen.after_step(ConvHost())
    half = ConvHost().half()
    with pytest.raises(UsageError, match="bit-identically"):
        FrozenKernels(half, [HostSlot("conv1", "weight", 0)], eph[:1])

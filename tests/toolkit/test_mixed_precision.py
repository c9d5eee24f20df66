"""Devices and mixed precision in the shared training loop (issue 20, item 4).

bf16 autocast and fp16 with loss scaling run on the CPU here: the forward pass runs in the low
precision, the weights, the optimizer and the embedding penalty stay float32, and frozen EPH
kernels come out bit-identical. The CUDA cases need a GPU and are skipped (with the reason) where
there is none; the GPU run of this file has not been done on the machines these tests were written on.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from auditor.errors import UsageError
from auditor.plugins.hufunet.freezing import FrozenKernels
from auditor.plugins.hufunet.placement import HostView, place, retrieve
from auditor.toolkit import training
from auditor.toolkit.training import TrainConfig, autocast_dtype, resolve_device, scaled_step, train

pytestmark = pytest.mark.usefixtures("one_thread")

NO_CUDA = "needs a CUDA device (none here): the GPU run is still to be done on a machine with one"
KEY = bytes(range(32))


class Host(nn.Module):
    """A small conv host whose forward records the dtype its convolution computed in."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.fc = nn.Linear(16, 3)
        self.seen: set[torch.dtype] = set()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.conv1(x))
        self.seen.add(h.dtype)
        return self.fc(F.relu(self.conv2(h)).mean(dim=(2, 3)))


def _data() -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    y = torch.arange(96) % 3
    x = torch.randn(96, 1, 6, 6, generator=g) + y.float().reshape(-1, 1, 1, 1)
    return TensorDataset(x, y)


def _frozen(model: Host) -> tuple[FrozenKernels, HostView, list[int], torch.Tensor]:
    names = ["conv1.weight", "conv2.weight"]  # 8 + 128 kernels
    params = dict(model.named_parameters())
    host = HostView.from_tensors([(n, params[n].detach()) for n in names])
    eph = torch.randn(24, 3, 3, generator=torch.Generator().manual_seed(7))
    positions = place(eph, KEY, host.n)
    return FrozenKernels.for_host(model, host, positions, eph), host, positions, eph


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_eph_stays_bit_identical_under_mixed_precision(precision: str) -> None:
    torch.manual_seed(0)
    model = Host()
    frozen, host, positions, eph = _frozen(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with frozen:
        result = train(model, _data(), TrainConfig(epochs=2, batch_size=16, lr=0.01, optimizer="adamw",
                                                   weight_decay=0.1, precision=precision),
                       after_step=frozen.after_step)  # fmt: skip
    expected = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    assert model.seen == {expected}  # the forward pass ran in the low precision
    assert all(p.dtype == torch.float32 for p in model.parameters())  # the weights stayed float32
    assert frozen.intact()
    assert torch.equal(retrieve(host, positions).view(torch.int32), eph.view(torch.int32))
    assert not torch.equal(model.conv2.weight, before["conv2.weight"])  # the rest trained
    assert result.steps == 12 and all(torch.isfinite(torch.tensor(result.losses)))


def test_the_penalty_is_computed_in_float32_outside_autocast() -> None:
    torch.manual_seed(0)
    model = Host()
    dtypes: list[torch.dtype] = []

    def penalty(m: nn.Module) -> torch.Tensor:
        term = (m.get_parameter("conv2.weight") ** 2).sum() * 1e-4
        dtypes.append(term.dtype)
        assert not torch.is_autocast_enabled("cpu")
        return term

    train(model, _data(), TrainConfig(epochs=1, batch_size=32, precision="bf16"), penalty=penalty)
    assert dtypes == [torch.float32] * 3


def test_fp16_loss_scaling_skips_an_overflowing_step_and_frozen_weights_hold() -> None:
    """GradScaler's logic on the CPU: a step whose gradients hold an inf is skipped (the weights stay
    as they were), the scale is halved, and the frozen kernels are still written back after it."""
    torch.manual_seed(0)
    model = Host()
    frozen, *_ = _frozen(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = training.grad_scaler("fp16", torch.device("cpu"))
    assert scaler is not None
    x, y = _data().tensors
    with frozen:
        weights = model.fc.weight.detach().clone()
        scale = scaler.get_scale()
        loss = F.cross_entropy(model(x), y) * torch.tensor(float("inf"))
        optimizer.zero_grad()
        assert scaled_step(scaler, optimizer, loss) == 1
        assert torch.equal(model.fc.weight, weights) and scaler.get_scale() == scale / 2
        frozen.after_step(model)
        optimizer.zero_grad()
        assert scaled_step(scaler, optimizer, F.cross_entropy(model(x), y)) == 0
        assert not torch.equal(model.fc.weight, weights)
        frozen.after_step(model)
        assert frozen.intact()


def test_precision_and_device_errors() -> None:
    with pytest.raises(UsageError, match="unknown precision 'fp8'; one of fp32, bf16, fp16"):
        TrainConfig(precision="fp8")
    with pytest.raises(UsageError, match="unknown precision"):
        autocast_dtype("int4", torch.device("cpu"))
    assert autocast_dtype("fp32", torch.device("cpu")) is None
    assert training.grad_scaler("bf16", torch.device("cpu")) is None
    with pytest.raises(UsageError, match="bad device 'tpu'"):
        resolve_device("tpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cuda_requested_without_cuda_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="CUDA is not available here"):
        resolve_device("cuda:0")


@pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_cuda_training_keeps_eph_bit_identical(precision: str) -> None:
    torch.manual_seed(0)
    model = Host()
    frozen, *_ = _frozen(model)
    with frozen:
        train(model, _data(), TrainConfig(epochs=2, batch_size=16, lr=0.01, device="cuda", precision=precision),
              after_step=frozen.after_step)  # fmt: skip
    assert next(model.parameters()).device.type == "cuda"
    model.to("cpu")
    assert frozen.intact()


@pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)
def test_cuda_embedders_end_to_end(tmp_path: Any, hufunet_owner: Any) -> None:
    """Both embedders on the GPU in mixed precision: their checks pass and the files are written."""
    from auditor import keys
    from auditor.plugins.greedy_residuals.embedder import embed_greedy_residuals
    from auditor.plugins.hufunet.embedder import embed_hufunet

    key = keys.generate_keypair(tmp_path / "keys", algorithm="ed25519").private
    gr = embed_greedy_residuals(key=key, message="(c) gpu", out_dir=tmp_path / "gr", device="cuda",
                                precision="fp16", epochs=8)  # fmt: skip
    assert gr["device"].startswith("cuda") and gr["check"]["passed"]
    hufunet = embed_hufunet(hufunet=hufunet_owner.secret, out_dir=tmp_path / "hufunet", device="cuda",
                            precision="bf16", epochs=4)  # fmt: skip
    assert hufunet["check"]["bit_identical_fraction"] == 1.0 and hufunet["check"]["passed"]


def test_a_layer_without_low_precision_kernels_is_a_one_line_usage_error() -> None:
    """(An LSTM in fp16 on the CPU is one: oneDNN has no kernel for it.)"""

    class NoHalf(Host):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if torch.is_autocast_enabled("cpu"):
                raise RuntimeError("could not create a primitive descriptor\nmore detail")
            return super().forward(x)

    with pytest.raises(UsageError, match=r"^the model's forward pass does not run in fp16 on cpu: could not create a "
                       r"primitive descriptor; use another --precision$"):  # fmt: skip
        train(NoHalf(), _data(), TrainConfig(epochs=1, precision="fp16"))
    train(NoHalf(), _data(), TrainConfig(epochs=1, precision="fp32"))  # runs

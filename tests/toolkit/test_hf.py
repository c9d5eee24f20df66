"""auditor.toolkit.hf: the Trainer adds the penalties to the training loss only, runs the after-step
hooks after every optimizer step, and hands both the model it was given."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers", reason="the optional extra hf is not installed")

from auditor.toolkit.hf import WatermarkTrainer, add_penalties  # noqa: E402 (after the skip)

pytestmark = pytest.mark.usefixtures("one_thread")


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        logits = self.fc(x)
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = nn.functional.cross_entropy(logits, labels)
        return out


class Rows(torch.utils.data.Dataset):  # type: ignore[type-arg]
    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randn(40, 4, generator=g), torch.arange(40) % 2

    def __len__(self) -> int:
        return 40

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[i], "labels": self.y[i]}


def test_penalties_while_training_and_hooks_after_every_step(tmp_path: Any) -> None:
    torch.manual_seed(0)
    model = Tiny()
    seen: dict[str, list[Any]] = {"penalty": [], "hook": []}

    def penalty(m: nn.Module) -> torch.Tensor:
        seen["penalty"].append((m is model, torch.is_autocast_enabled("cpu")))
        return 100.0 * m.get_parameter("fc.weight").abs().sum()

    def hook(m: nn.Module) -> None:
        seen["hook"].append(m is model)
        with torch.no_grad():
            m.get_parameter("fc.bias").zero_()  # what a frozen weight's write-back does

    args = transformers.TrainingArguments(output_dir=str(tmp_path), num_train_epochs=2, per_device_train_batch_size=10,
                                          learning_rate=0.05, report_to=[], save_strategy="no", use_cpu=True,
                                          disable_tqdm=True, logging_strategy="no", seed=0)  # fmt: skip
    trainer = WatermarkTrainer(model=model, args=args, train_dataset=Rows(), eval_dataset=Rows(),
                               penalties=[penalty], after_step=[hook])  # fmt: skip
    result = trainer.train()
    assert result.global_step == 8
    assert seen["penalty"] == [(True, False)] * 8  # once per step, on the model given, outside autocast
    assert len(seen["hook"]) >= 8 and all(seen["hook"])
    assert torch.equal(model.fc.bias, torch.zeros(2))
    assert result.training_loss > 100.0 * 0.05  # the penalty was part of the loss it trained on
    calls = len(seen["penalty"])
    trainer.evaluate()
    assert len(seen["penalty"]) == calls  # evaluation's loss is the task's alone


def test_add_penalties_is_float32_and_leaves_the_loss_alone_without_any() -> None:
    weight = nn.Parameter(torch.ones(3))
    loss = torch.tensor(2.0, dtype=torch.bfloat16)
    assert add_penalties(loss, nn.Module(), []) is loss
    total = add_penalties(loss, nn.Module(), [lambda m: weight.sum() * 0.5])
    assert total.dtype == torch.bfloat16 and float(total.detach()) == 3.5

"""Watermarks in a Hugging Face ``transformers.Trainer``: penalties added to the loss, hooks after every step.

The owner's side of a scheme gives a *penalty* (a function of the model
returning a scalar tensor to add to the loss) and/or an *after-step hook*
(called with the model after every optimizer step, for example to write
frozen weights back). :class:`WatermarkTrainer` is a ``Trainer`` that takes
both::

    trainer = WatermarkTrainer(model=model, args=args, train_dataset=train_set,
                               penalties=[watermark.penalty], after_step=[frozen.after_step])
    trainer.train()

Penalties are computed outside autocast, on the float32 weights, and only in
training (not in evaluation). A project with its own ``Trainer`` subclass
uses :func:`add_penalties` in its ``compute_loss`` and :class:`AfterStepCallback`.

``transformers`` is the optional extra ``hf`` (``pip install auditor[hf]``):
this module imports it, and nothing in auditor imports this module, so
auditing never loads it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import transformers
from torch import nn

__all__ = ["AfterStepCallback", "Penalty", "WatermarkTrainer", "add_penalties"]

#: A function of the (unwrapped) model returning a scalar tensor to add to the loss.
Penalty = Callable[[nn.Module], torch.Tensor]


def add_penalties(loss: torch.Tensor, model: nn.Module, penalties: Sequence[Penalty]) -> torch.Tensor:
    """``loss`` plus every penalty of ``model``, each computed in float32 outside autocast."""
    if not penalties:
        return loss
    device_type = loss.device.type
    with torch.autocast(device_type=device_type, enabled=False):
        extra = torch.stack([p(model).float() for p in penalties]).sum()
    return loss + extra.to(loss.dtype)


class AfterStepCallback(transformers.TrainerCallback):
    """Calls each hook with ``model`` after every optimizer step (and again at the step's end, for
    ``transformers`` versions without the optimizer-step event; the hooks must be idempotent, as
    writing frozen weights back is)."""

    def __init__(self, model: nn.Module, hooks: Sequence[Callable[[nn.Module], None]]) -> None:
        self.model = model
        self.hooks = list(hooks)

    def _run(self) -> None:
        for hook in self.hooks:
            hook(self.model)

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Right after ``optimizer.step()``."""
        self._run()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """At the end of a training step (after the scheduler)."""
        self._run()


class WatermarkTrainer(transformers.Trainer):
    """A ``transformers.Trainer`` whose training loss includes ``penalties`` and which runs
    ``after_step`` hooks after every optimizer step; every other argument is the Trainer's own.

    Hooks and penalties receive the model the Trainer was given (never a distributed wrapper),
    so parameter names are the owner's.
    """

    def __init__(
        self,
        *args: Any,
        penalties: Sequence[Penalty] = (),
        after_step: Sequence[Callable[[nn.Module], None]] = (),
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.penalties = list(penalties)
        self.owner_model: nn.Module = self.model  # type: ignore[assignment]
        if after_step:
            self.add_callback(AfterStepCallback(self.owner_model, after_step))

    # **kwargs: transformers 4.46 added num_items_in_batch; earlier versions pass nothing more.
    def compute_loss(  # type: ignore[override]
        self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False, **kwargs: Any
    ) -> Any:
        """The Trainer's loss, plus the penalties while training."""
        result: Any = super().compute_loss(model, inputs, return_outputs=return_outputs, **kwargs)
        loss, outputs = result if return_outputs else (result, None)
        if model.training:
            loss = add_penalties(loss, self.owner_model, self.penalties)
        return (loss, outputs) if return_outputs else loss

"""A small, seeded training loop shared by the embedders, mixed precision, the embedding check, and
atomic model saving.

``train`` adds an embedder's penalty to the cross-entropy on every step and
calls ``after_step`` after every optimizer step (an embedder that freezes
weights writes them back there). With the same seed, model initialisation
and data, it gives bit-identical weights on CPU.

Mixed precision (``TrainConfig.precision``): ``bf16`` and ``fp16`` run the
model's forward pass under ``torch.autocast``; the weights, their gradients,
the optimizer and the embedding penalty stay float32 (the penalty is computed
outside autocast, on the float32 weights), so a frozen weight is written back
bit for bit. ``fp16`` scales the loss with a ``GradScaler`` (a step whose
gradients overflow is skipped and ``after_step`` still runs).

An embedder ends by measuring what it embedded (:class:`EmbeddingCheck`);
:meth:`EmbeddingCheck.require` raises :class:`EmbeddingCheckError` (exit code
1, nothing written) when a detector would not find the watermark.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from auditor.errors import EXIT_NOT_FOUND, AuditorError, UsageError
from auditor.safeio import write_atomically

__all__ = [
    "OPTIMIZERS",
    "PRECISIONS",
    "EmbeddingCheck",
    "EmbeddingCheckError",
    "TrainConfig",
    "TrainResult",
    "autocast_dtype",
    "evaluate",
    "grad_scaler",
    "model_files",
    "refuse_existing",
    "resolve_device",
    "save_model",
    "train",
]

OPTIMIZERS = ("adam", "sgd", "adamw")
#: ``--precision``: float32 throughout, or autocast to bfloat16 / float16 (with loss scaling) for the forward pass.
PRECISIONS = ("fp32", "bf16", "fp16")


def resolve_device(spec: str) -> torch.device:
    """``auto`` (CUDA when available, else CPU), ``cpu``, or ``cuda`` / ``cuda:N``.

    Raises :class:`~auditor.errors.UsageError` for an unknown spec or a CUDA
    device this machine does not have.
    """
    s = spec.strip().lower()
    if s == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if s == "cpu":
        return torch.device("cpu")
    if s == "cuda" or s.startswith("cuda:"):
        try:
            device = torch.device(s)
        except RuntimeError:
            raise UsageError(f"bad device {spec!r}; use auto, cpu, cuda or cuda:N") from None
        if not torch.cuda.is_available():
            raise UsageError(f"device {spec!r} requested but CUDA is not available here")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"device {spec!r} requested but this machine has {torch.cuda.device_count()} CUDA devices")
        return device
    raise UsageError(f"bad device {spec!r}; use auto, cpu, cuda or cuda:N")


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The dtype ``torch.autocast`` runs the forward pass in for ``precision`` on ``device``
    (``None`` for fp32). Raises :class:`~auditor.errors.UsageError` for an unknown precision or
    a CUDA device without bfloat16."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise UsageError(f"{device} does not support bfloat16; use --precision fp16 or fp32")
        return torch.bfloat16
    if precision == "fp16":
        return torch.float16
    raise UsageError(f"unknown precision {precision!r}; one of {', '.join(PRECISIONS)}")


def grad_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler | None:
    """The loss scaler fp16 needs (float16 gradients underflow without it) on ``device``; ``None`` otherwise."""
    return torch.amp.GradScaler(device.type) if precision == "fp16" else None


@dataclass
class TrainConfig:
    """Hyper-parameters of :func:`train`. ``momentum`` only applies to SGD; ``schedule``
    is ``constant`` or ``cosine`` (annealed to zero over all steps); ``precision`` one of
    :data:`PRECISIONS` (see the module docstring)."""

    epochs: int = 30
    batch_size: int = 64
    lr: float = 1e-3
    optimizer: str = "adam"
    momentum: float = 0.9
    weight_decay: float = 0.0
    seed: int = 0
    device: str = "cpu"
    schedule: str = "constant"
    precision: str = "fp32"

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise UsageError(f"unknown precision {self.precision!r}; one of {', '.join(PRECISIONS)}")
        if self.schedule not in ("constant", "cosine"):
            raise UsageError(f"unknown learning-rate schedule {self.schedule!r}; one of constant, cosine")
        if self.optimizer not in OPTIMIZERS:
            raise UsageError(f"unknown optimizer {self.optimizer!r}; one of {', '.join(OPTIMIZERS)}")
        if self.epochs < 0 or self.batch_size < 1 or not self.lr > 0:
            raise UsageError("epochs must be >= 0, batch size >= 1 and the learning rate > 0")


@dataclass
class TrainResult:
    """What a :func:`train` run did: mean task loss and mean penalty per epoch, steps, seconds, and
    (fp16) the optimizer steps the loss scaler skipped because the gradients overflowed."""

    losses: list[float] = field(default_factory=list)
    penalties: list[float] = field(default_factory=list)
    steps: int = 0
    seconds: float = 0.0
    skipped_steps: int = 0


def _optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)


def _batches(
    data: Dataset[tuple[torch.Tensor, ...]], batch_size: int, generator: torch.Generator, *, shuffle: bool
) -> tuple[int, Callable[[], Iterator[tuple[torch.Tensor, torch.Tensor]]]]:
    """Number of batches per pass and a function yielding ``(inputs, labels)`` batches.

    Tensor data sets are sliced directly (a DataLoader's per-sample collation
    costs more than a small model's step); anything else goes through a
    DataLoader with the same generator.
    """
    n = len(data)  # type: ignore[arg-type]
    count = math.ceil(n / batch_size)
    if isinstance(data, TensorDataset):
        tensors = data.tensors

        def sliced() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
            order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
            for start in range(0, n, batch_size):
                idx = order[start : start + batch_size]
                yield tensors[0][idx], tensors[-1][idx]

        return count, sliced
    loader = DataLoader(data, batch_size=batch_size, shuffle=shuffle, generator=generator)
    return count, lambda: ((b[0], b[-1]) for b in loader)


def train(
    model: nn.Module,
    train_set: Dataset[tuple[torch.Tensor, ...]],
    config: TrainConfig,
    *,
    penalty: Callable[[nn.Module], torch.Tensor] | None = None,
    after_step: Callable[[nn.Module], None] | None = None,
    progress: bool = False,
) -> TrainResult:
    """Train ``model`` in place on ``(inputs, labels)`` batches with cross-entropy
    plus ``penalty(model)`` on every step.

    Shuffling is drawn from a generator seeded with ``config.seed``; the
    model's initial weights are the caller's (build it after seeding). With
    ``progress`` a rich progress bar is drawn on stderr.
    """
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    device = resolve_device(config.device)
    amp = autocast_dtype(config.precision, device)
    scaler = grad_scaler(config.precision, device)
    model.to(device)
    model.train()
    optimizer = _optimizer(model, config)
    generator = torch.Generator().manual_seed(config.seed)
    per_epoch, batches = _batches(train_set, config.batch_size, generator, shuffle=True)
    schedule = (
        torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(config.epochs * per_epoch, 1))
        if config.schedule == "cosine"
        else None
    )
    result = TrainResult()
    started = time.perf_counter()
    with Progress(
        TextColumn("training"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("epoch {task.fields[epoch]}  loss {task.fields[loss]}"),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        transient=False,
        disable=not progress,
    ) as bar:
        task = bar.add_task("training", total=config.epochs * per_epoch, epoch=0, loss="-")
        for epoch in range(config.epochs):
            loss_sum = penalty_sum = 0.0
            seen = 0
            for inputs, labels in batches():
                xb, yb = inputs.to(device), labels.to(device)
                optimizer.zero_grad(set_to_none=True)
                try:
                    with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
                        logits = model(xb)
                except RuntimeError as exc:
                    if amp is None:
                        raise
                    # Some layers have no low-precision kernel on some devices (an LSTM in fp16 on the CPU).
                    reason = (str(exc).strip().splitlines() or ["failed"])[0]
                    raise UsageError(f"the model's forward pass does not run in {config.precision} on {device}: "
                                     f"{reason}; use another --precision") from None  # fmt: skip
                loss = F.cross_entropy(logits.float(), yb)
                total = loss
                if penalty is not None:
                    extra = penalty(model)  # outside autocast: on the float32 weights
                    total = loss + extra
                    penalty_sum += float(extra.detach()) * len(yb)
                if scaler is None:
                    total.backward()
                    optimizer.step()
                else:
                    result.skipped_steps += scaled_step(scaler, optimizer, total)
                if schedule is not None:
                    schedule.step()
                if after_step is not None:
                    after_step(model)
                loss_sum += float(loss.detach()) * len(yb)
                seen += len(yb)
                result.steps += 1
                bar.advance(task)
            result.losses.append(loss_sum / max(seen, 1))
            result.penalties.append(penalty_sum / max(seen, 1))
            bar.update(task, epoch=epoch + 1, loss=f"{result.losses[-1]:.4f}")
    result.seconds = time.perf_counter() - started
    return result


def scaled_step(scaler: torch.amp.GradScaler, optimizer: torch.optim.Optimizer, loss: torch.Tensor) -> int:
    """One fp16 optimizer step: backward on the scaled loss, step (skipped by the scaler when a
    gradient is inf or NaN), update the scale. Returns 1 when the step was skipped, else 0."""
    before = scaler.get_scale()
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return int(scaler.get_scale() < before)


class EmbeddingCheckError(AuditorError):
    """The watermark an embedder just embedded would not be found by its detector (exit code 1)."""

    exit_code = EXIT_NOT_FOUND


@dataclass
class EmbeddingCheck:
    """What an embedder measured of the watermark it just embedded, and whether its detector would find it.

    ``measures`` is JSON-ready (the scheme's figures and the bar each had to reach); ``shortfalls``
    has one sentence per figure below its bar; ``relax`` says how to accept a weaker watermark (the
    option that lowers the bar) or get a stronger one.
    """

    scheme: str
    measures: dict[str, Any]
    shortfalls: list[str] = field(default_factory=list)
    relax: str = ""

    @property
    def passed(self) -> bool:
        """Whether every figure reached its bar."""
        return not self.shortfalls

    def message(self) -> str:
        """One line: what fell short and what to do about it."""
        if self.passed:
            return f"{self.scheme}: the embedded watermark would be found"
        tail = f"; {self.relax}" if self.relax else ""
        return f"{self.scheme}: the watermark would not be found: {'; '.join(self.shortfalls)}{tail}"

    def require(self) -> EmbeddingCheck:
        """``self`` if it passed; else raise :class:`EmbeddingCheckError` with :meth:`message`."""
        if not self.passed:
            raise EmbeddingCheckError(self.message())
        return self

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form for a summary."""
        return {"passed": self.passed, **self.measures, "shortfalls": list(self.shortfalls)}


@torch.no_grad()
def evaluate(model: nn.Module, dataset: Dataset[tuple[torch.Tensor, ...]], device: torch.device | str = "cpu") -> float:
    """Top-1 accuracy of ``model`` on ``(inputs, labels)`` (a fraction in [0, 1]).

    The model is put in eval mode for the measurement and left in the mode it was in.
    """
    dev = resolve_device(device) if isinstance(device, str) else device
    was_training = model.training
    model.to(dev)
    model.eval()
    correct = total = 0
    _, batches = _batches(dataset, 512, torch.Generator(), shuffle=False)
    try:
        for xb, yb in batches():
            pred = model(xb.to(dev)).argmax(dim=1)
            correct += int((pred == yb.to(dev)).sum())
            total += len(yb)
    finally:
        model.train(was_training)
    return correct / total if total else 0.0


def model_files(out_dir: Path, stem: str = "model") -> dict[str, Path]:
    """The files :func:`save_model` writes: ``out_dir/stem.safetensors`` and ``out_dir/stem.pt``."""
    return {"safetensors": Path(out_dir) / f"{stem}.safetensors", "pt": Path(out_dir) / f"{stem}.pt"}


def refuse_existing(paths: Iterable[Path], *, overwrite: bool, hint: str) -> None:
    """Raise :class:`~auditor.errors.UsageError` naming those of ``paths`` that exist, unless ``overwrite``."""
    existing = [str(p) for p in paths if Path(p).exists()]
    if existing and not overwrite:
        raise UsageError(f"{', '.join(existing)} already exists; {hint}")


def save_model(model: nn.Module, out_dir: Path, stem: str = "model", *, overwrite: bool = False) -> dict[str, Path]:
    """Write ``model``'s state dict as ``out_dir/stem.safetensors`` and ``out_dir/stem.pt``
    (a plain state dict, loadable with ``torch.load(..., weights_only=True)``).

    Each file is written to a temporary name and renamed into place. Raises
    :class:`~auditor.errors.UsageError` if either file exists, unless ``overwrite``.
    """
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    paths = model_files(out_dir, stem)
    refuse_existing(paths.values(), overwrite=overwrite, hint="choose another folder or overwrite")
    out_dir.mkdir(parents=True, exist_ok=True)
    # Clones: safetensors refuses tensors that share storage (tied weights), and CUDA tensors come home.
    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    write_atomically(paths["safetensors"], lambda p: save_file(state, str(p), metadata={"format": "pt"}))
    write_atomically(paths["pt"], lambda p: _torch_save(state, p))
    return paths


def _torch_save(state: dict[str, torch.Tensor], path: Path) -> None:
    # Through a file object: given a path, torch.save names the archive's records after the (temporary,
    # random) file name, so the same weights would give different bytes and SHA-256 on every run.
    with open(path, "wb") as fh:
        torch.save(state, fh)

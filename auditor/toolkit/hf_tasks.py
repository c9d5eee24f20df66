"""Transformer owners on a CPU: small ``transformers`` models from configurations, and built-in tasks to train.

Four architectures, each built from its ``transformers`` configuration (nothing is downloaded) at a small
width (:class:`Recipe`: width 128, two blocks, four heads, MLP width 512):

========  ===============================  =========================================================
``arch``  model                            built-in task (:func:`task_for`)
========  ===============================  =========================================================
gpt2      ``GPT2LMHeadModel``              next-token prediction on arithmetic sequences
llama     ``LlamaForCausalLM`` (RMSNorm,   the same; 4 query heads in 2 key/value groups
          rotary attention)
bert      ``BertForSequenceClassification``  whether most of 16 tokens are below half the vocabulary
vit       ``ViTForImageClassification``    scikit-learn's 8x8 digits, cut into 2x2 patches
========  ===============================  =========================================================

An arithmetic sequence is ``a, a+s, a+2s, ...`` modulo the vocabulary (64 tokens) with a start ``a`` and a
step ``s`` of 1, 2 or 3 drawn per sequence: the next token follows once two are seen, so the model must
read its context through attention. An owner's loop with two watermarks in separate layers is
``examples/owner_transformers.py`` (docs/owners.md, "Transformers"): ``build``, ``task_for``, a scheme that
hosts in :func:`attention_layers`, a scheme that keeps its default layers (these models' MLP matrices), and
:func:`train` with the one's loss penalty and the other's after-step hook. ``transformers`` is the optional
extra ``hf`` (``pip install "auditor[hf]"``): this module imports it on first use, and nothing in auditor
imports this module, so auditing never loads it.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from auditor.errors import UsageError

__all__ = [
    "ARCHITECTURES",
    "DEFAULT_STEPS",
    "Recipe",
    "Task",
    "attention_layers",
    "build",
    "save_pretrained",
    "task_for",
    "train",
]

ARCHITECTURES = ("gpt2", "llama", "bert", "vit")
#: Adam steps of batch 32 that embed both marks on every architecture at the default recipe (docs/owners.md).
DEFAULT_STEPS = 200
#: The vocabulary of the token tasks, and the length of their sequences.
VOCAB, LENGTH = 64, 16
#: Attention matrices are the linear layers under a module whose name says attention.
_ATTENTION = re.compile(r"(^|\.)[a-z_]*(attn|attention)[a-z_]*(\.|$)")


@dataclass(frozen=True)
class Recipe:
    """The size of a model :func:`build` makes: residual width, blocks, attention heads, MLP width;
    ``kv_heads`` are the Llama-style decoder's key/value groups."""

    width: int = 128
    blocks: int = 2
    heads: int = 4
    mlp: int = 512
    kv_heads: int = 2


def _check(arch: str) -> str:
    if arch not in ARCHITECTURES:
        raise UsageError(f"unknown transformer architecture {arch!r}; choose one of {', '.join(ARCHITECTURES)}")
    return arch


def build(arch: str, recipe: Recipe = Recipe()) -> nn.Module:
    """A freshly initialised model of ``arch`` (seed torch first for the same weights) from its
    ``transformers`` configuration at ``recipe``'s size, for :func:`task_for` ``(arch)``."""
    import transformers as hf

    r = recipe
    if _check(arch) == "gpt2":
        return hf.GPT2LMHeadModel(hf.GPT2Config(
            vocab_size=VOCAB, n_positions=LENGTH + 1, n_embd=r.width, n_layer=r.blocks, n_head=r.heads,
            n_inner=r.mlp, bos_token_id=0, eos_token_id=0))  # fmt: skip
    if arch == "llama":
        return hf.LlamaForCausalLM(hf.LlamaConfig(
            vocab_size=VOCAB, hidden_size=r.width, intermediate_size=r.mlp, num_hidden_layers=r.blocks,
            num_attention_heads=r.heads, num_key_value_heads=r.kv_heads, max_position_embeddings=LENGTH + 1,
            tie_word_embeddings=False, bos_token_id=0, eos_token_id=0))  # fmt: skip
    # num_labels is a keyword of every configuration's base class, which the typed signatures leave out.
    labels: dict[str, Any] = {"num_labels": 2 if arch == "bert" else 10}
    if arch == "bert":
        bert = hf.BertConfig(vocab_size=VOCAB, hidden_size=r.width, num_hidden_layers=r.blocks,
                             num_attention_heads=r.heads, intermediate_size=r.mlp, max_position_embeddings=LENGTH,
                             **labels)  # fmt: skip
        return hf.BertForSequenceClassification(bert)
    vit = hf.ViTConfig(image_size=8, patch_size=2, num_channels=1, hidden_size=r.width, num_hidden_layers=r.blocks,
                       num_attention_heads=r.heads, intermediate_size=r.mlp, **labels)  # fmt: skip
    return hf.ViTForImageClassification(vit)


@dataclass(frozen=True)
class Task:
    """A built-in task: ``batch(generator, size)`` draws training inputs (keyword arguments of the model,
    and ``target``), ``held_out()`` the fixed held-out set, ``loss(model, batch)`` is the task's
    cross-entropy and ``hits(model, batch)`` marks what the model gets right (next tokens, or labels)."""

    name: str
    batch: Callable[[torch.Generator, int], dict[str, torch.Tensor]]
    held_out: Callable[[], dict[str, torch.Tensor]]
    loss: Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor]
    hits: Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor]

    @torch.no_grad()
    def accuracy(self, model: nn.Module) -> float:
        """The share of the held-out set ``model`` gets right (in eval mode; its mode is restored)."""
        was_training = model.training
        model.eval()
        try:
            return float(self.hits(model, self.held_out()).mean())
        finally:
            model.train(was_training)


def _arithmetic(generator: torch.Generator, size: int) -> dict[str, torch.Tensor]:
    start = torch.randint(0, VOCAB, (size, 1), generator=generator)
    step = torch.randint(1, 4, (size, 1), generator=generator)
    return {"input_ids": (start + step * torch.arange(LENGTH + 1)) % VOCAB}


def _next_token_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    seq = batch["input_ids"]
    logits = model(input_ids=seq[:, :-1]).logits
    return nn.functional.cross_entropy(logits.reshape(-1, VOCAB), seq[:, 1:].reshape(-1))


def _next_token_hits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    # From the third token on, where the step is determined by what came before.
    seq = batch["input_ids"]
    return (model(input_ids=seq[:, :-1]).logits[:, 1:].argmax(-1) == seq[:, 2:]).float()


def _majority(generator: torch.Generator, size: int) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, VOCAB, (size, LENGTH), generator=generator)
    return {"input_ids": ids, "target": ((ids < VOCAB // 2).sum(1) > LENGTH // 2).long()}


def _digits(generator: torch.Generator, size: int) -> dict[str, torch.Tensor]:
    from auditor.toolkit.data import digits

    images, labels = digits().train.tensors
    pick = torch.randint(0, len(labels), (size,), generator=generator)
    return {"pixel_values": images[pick], "target": labels[pick]}


def _digits_test() -> dict[str, torch.Tensor]:
    from auditor.toolkit.data import digits

    images, labels = digits().test.tensors
    return {"pixel_values": images, "target": labels}


def _drawn(batch: Callable[[torch.Generator, int], dict[str, torch.Tensor]]) -> Callable[[], dict[str, torch.Tensor]]:
    """A held-out set of 512 drawn from a seed no training run uses."""
    return lambda: batch(torch.Generator().manual_seed(10_000), 512)


def _inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in batch.items() if k != "target"}


def _label_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return nn.functional.cross_entropy(model(**_inputs(batch)).logits, batch["target"])


def _label_hits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return (model(**_inputs(batch)).logits.argmax(-1) == batch["target"]).float()


def task_for(arch: str) -> Task:
    """The built-in task of ``arch``: arithmetic sequences for the decoders, the majority of tokens
    for BERT, the digits for ViT (see the module's table)."""
    if _check(arch) in ("gpt2", "llama"):
        return Task("arithmetic sequences (next token)", _arithmetic, _drawn(_arithmetic), _next_token_loss,
                    _next_token_hits)  # fmt: skip
    if arch == "bert":
        return Task("majority of tokens below 32", _majority, _drawn(_majority), _label_loss, _label_hits)
    return Task("digits, 8x8 in 2x2 patches", _digits, _digits_test, _label_loss, _label_hits)


def attention_layers(model: nn.Module) -> list[str]:
    """The attention matrices of ``model`` in module order, as layer names for a scheme that hosts there: every
    linear layer (GPT-2's ``Conv1D`` too) under a module whose name says attention (``attn``,
    ``self_attn``, ``attention``): Q, K, V and O, or GPT-2's fused ``c_attn`` and its ``c_proj``."""
    from auditor.graph import LayerKind
    from auditor.toolkit.models import model_graph

    names = [layer.name for layer in model_graph(model).of_kind(LayerKind.LINEAR) if _ATTENTION.search(layer.name)]
    if not names:
        raise UsageError("the model has no linear layer under an attention module")
    return names


def train(
    model: nn.Module,
    task: Task,
    *,
    steps: int = DEFAULT_STEPS,
    lr: float = 1e-3,
    batch_size: int = 32,
    seed: int = 0,
    penalty: Callable[[nn.Module], torch.Tensor] | None = None,
    after_step: Callable[[nn.Module], None] | None = None,
) -> dict[str, Any]:
    """Train ``model`` on ``task`` for ``steps`` Adam steps of ``batch_size`` (batches drawn from ``seed``),
    adding ``penalty(model)`` to every loss (a penalty-trained watermark) and calling ``after_step(model)``
    after every optimiser step (a watermark that writes kernels back). Leaves the model in eval mode; returns the
    last loss, the held-out accuracy and the seconds it took."""
    if steps < 1:
        raise UsageError(f"steps must be 1 or more, not {steps}")
    began = time.perf_counter()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    loss = torch.zeros(())
    for _ in range(steps):
        loss = task.loss(model, task.batch(generator, batch_size))
        if penalty is not None:
            loss = loss + penalty(model)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if after_step is not None:
            after_step(model)
    model.eval()
    seconds = time.perf_counter() - began
    return {"steps": steps, "loss": float(loss.detach()), "accuracy": task.accuracy(model), "seconds": seconds}


def save_pretrained(model: nn.Module, out: Path) -> dict[str, Path]:
    """``model.save_pretrained(out)``: the released folder (``config.json`` and the weights, sharded past the
    saver's shard size). Returns ``{"safetensors": ...}``, the weights file or the shards' index, as the
    owner bundles' writers take it."""
    out = Path(out)
    model.save_pretrained(out)  # type: ignore[operator]
    for name in ("model.safetensors", "model.safetensors.index.json"):
        if (out / name).is_file():
            return {"safetensors": out / name}
    raise UsageError(f"save_pretrained wrote no safetensors weights into {out}")

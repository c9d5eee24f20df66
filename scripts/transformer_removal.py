"""Removal at transformer scale: both watermarks in a Llama-style decoder against fine-tuning, LoRA, pruning, int8.

The owner is the decoder of the tests (tests/conftest.py ``gr_llama``: width 256, two blocks, 4 query heads
in 2 key/value groups, Greedy Residuals on the default layers, 60 steps of next-token prediction on counting
sequences), with HufuNet's EPH then planted in both blocks' MLP matrices (gate, up, down), as in
tests/plugins/restore/test_heads.py. The thief's removals, each on a copy of the owner's weights:

* full fine-tuning on the same task (the thief's own batches): learning rates 1e-4, 1e-3, 3e-3, 100 and
  300 steps (and 1e-2, 3e-2 for 300 steps); and 300 steps at 3e-3 on another task
  (counting down), which the model first fails at;
* LoRA (rank 8, alpha 16) on every attention and MLP projection, trained on the same task and merged back
  into the weights (W + (alpha/r) B A): learning rates 1e-3 and 1e-2, 100 and 300 steps;
* magnitude pruning of the attention and MLP matrices, global (one threshold over all) and per layer
  (each matrix its own), 25, 50, 75 and 90% of the weights set to zero;
* int8 weight quantisation: symmetric per-row int8 round trip of every matrix (embedding and head too);
  int4 the same way.

Each result is written as ``save_pretrained`` writes a model and audited with the real pipeline
(:func:`auditor.audit.pipeline.audit_suspect`, both owner bundles), without and with the owner's model as
``--reference``. Printed per removal: the attention and MLP matrices' relative change, the task's loss and
next-token accuracy on 64 held-out sequences, the overall verdict both ways, Greedy Residuals' verdict, rate
and log10 p, HufuNet's verdict, Acc_combined and DiffAcc (each from both audits). ``--json FILE`` writes
the rows. One thread (the machine is shared):

    OMP_NUM_THREADS=1 .venv/bin/python scripts/transformer_removal.py
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import tempfile
from pathlib import Path
from typing import Any

import torch

VOCAB = 64
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _batch(generator: torch.Generator, n: int = 32, step: int = 1) -> torch.Tensor:
    """Counting sequences of 17 tokens modulo 64 (``step`` -1: counting down, the thief's other task)."""
    return (torch.randint(0, VOCAB, (n, 1), generator=generator) + step * torch.arange(17)) % VOCAB


def _task_loss(model: Any, seq: torch.Tensor) -> torch.Tensor:
    logits = model(seq[:, :-1]).logits
    return torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), seq[:, 1:].reshape(-1))


@torch.no_grad()
def _evaluate(model: Any) -> tuple[float, float]:
    """Loss and next-token accuracy on 64 held-out counting sequences (a fixed seed no training uses)."""
    seq = _batch(torch.Generator().manual_seed(12345), 64)
    logits = model(seq[:, :-1]).logits
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), seq[:, 1:].reshape(-1))
    return float(loss), float((logits.argmax(-1) == seq[:, 1:]).float().mean())


def _owner(folder: Path) -> tuple[Any, Path, Path]:
    """The GR-marked decoder (the gr_llama recipe), HufuNet then planted in its MLP; both bundles."""
    from cryptography.hazmat.primitives.asymmetric import ed25519
    from transformers import LlamaConfig, LlamaForCausalLM

    from auditor.plugins.greedy_residuals.owner import GreedyResidualsWatermark
    from auditor.plugins.hufunet.owner import generate_hufunet, hmac_key, load_hufunet, plant, write_bundle

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=256, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=False)  # fmt: skip
    model = LlamaForCausalLM(config)
    key = ed25519.Ed25519PrivateKey.from_private_bytes(bytes(range(32, 64)))
    wm = GreedyResidualsWatermark.create(model, private_key=key, message="(c) L")
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(60):
        loss = _task_loss(model, _batch(generator)) + wm.penalty(model)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    generate_hufunet(out=folder / "secret.json", seed=0, epochs=20, hmac_key=hashlib.sha256(b"llama").digest())
    hufunet, secret = load_hufunet(folder / "secret.json")
    host = [f"model.layers.{i}.mlp.{p}" for i in (0, 1) for p in ("gate_proj", "up_proj", "down_proj")]
    embedded = plant(model, hufunet, hmac_key(secret), layers=host)
    embedded.frozen.detach()
    out = folder / "owner"
    model.save_pretrained(out)
    gr_bundle, hufu_bundle = out / "owner_bundle.json", out / "hufunet_bundle.json"
    wm.save_bundle(gr_bundle, model, model_file=out / "model.safetensors")
    write_bundle(hufu_bundle, model, embedded, hufunet, secret, files={"safetensors": out / "model.safetensors"},
                 architecture="LlamaForCausalLM")  # fmt: skip
    return model, gr_bundle, hufu_bundle


def _matrices(model: Any) -> list[tuple[str, torch.nn.Linear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.split(".")[-1]
            in PROJECTIONS]  # fmt: skip


def _finetune(owner: Any, lr: float, steps: int, seed: int, task: int = 1) -> Any:
    model = copy.deepcopy(owner)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        loss = _task_loss(model, _batch(generator, step=task))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model


class _LoRA(torch.nn.Module):
    """``base(x) + (alpha / r) * x A^T B^T`` with ``base`` frozen; B starts at zero (the model is unchanged)."""

    def __init__(self, base: torch.nn.Linear, rank: int, alpha: float) -> None:
        super().__init__()
        self.base, self.scale = base, alpha / rank
        self.a = torch.nn.Parameter(torch.randn(rank, base.in_features) / base.in_features**0.5)
        self.b = torch.nn.Parameter(torch.zeros(base.out_features, rank))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.scale * (x @ self.a.T) @ self.b.T

    def merged(self) -> torch.nn.Linear:
        with torch.no_grad():
            self.base.weight += self.scale * self.b @ self.a
        return self.base


def _lora(owner: Any, lr: float, steps: int, seed: int, *, rank: int = 8, alpha: float = 16.0) -> Any:
    torch.manual_seed(seed)
    model = copy.deepcopy(owner)
    for p in model.parameters():
        p.requires_grad_(False)
    adapters = []
    for name, linear in _matrices(model):
        parent = model.get_submodule(name.rsplit(".", 1)[0])
        adapter = _LoRA(linear, rank, alpha)
        setattr(parent, name.rsplit(".", 1)[1], adapter)
        adapters.append((parent, name.rsplit(".", 1)[1], adapter))
    optimizer = torch.optim.Adam([p for _, _, a in adapters for p in (a.a, a.b)], lr=lr)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        loss = _task_loss(model, _batch(generator))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    for parent, attr, adapter in adapters:
        setattr(parent, attr, adapter.merged())
    for p in model.parameters():
        p.requires_grad_(True)
    return model


@torch.no_grad()
def _prune(owner: Any, rate: float, scope: str) -> Any:
    model = copy.deepcopy(owner)
    weights = [m.weight for _, m in _matrices(model)]
    if scope == "global":
        magnitudes = torch.cat([w.abs().flatten() for w in weights])
        threshold = magnitudes.kthvalue(max(1, int(rate * magnitudes.numel()))).values
        for w in weights:
            w[w.abs() <= threshold] = 0
    else:
        for w in weights:
            threshold = w.abs().flatten().kthvalue(max(1, int(rate * w.numel()))).values
            w[w.abs() <= threshold] = 0
    return model


@torch.no_grad()
def _quantize(owner: Any, bits: int = 8) -> Any:
    model = copy.deepcopy(owner)
    top = 2 ** (bits - 1) - 1
    for p in model.parameters():
        if p.dim() == 2:
            scale = p.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / top
            p.copy_((p / scale).round().clamp(-top, top) * scale)
    return model


def _audit(model: Any, out: Path, inputs: dict[str, Any]) -> dict[str, Any]:
    from auditor.audit.pipeline import audit_suspect

    model.save_pretrained(out)
    loss, accuracy = _evaluate(model)
    row: dict[str, Any] = {"loss": round(loss, 4), "accuracy": round(accuracy, 4)}
    for how, given in inputs.items():
        record = audit_suspect(out / "model.safetensors", given)
        tag = "" if how == "reference" else "_alone"
        row[f"verdict{tag}"] = record.verdict.value
        if how == "reference":
            row["restorers_acted"] = [e["restorer"] for e in record.restore if e.get("log", {}).get("acted")]
        for f in record.findings:
            m = f.metrics
            if f.scheme == "greedy-residuals":
                row |= {f"gr{tag}": f.verdict.value, f"gr_rate{tag}": m.get("best_rate"),
                        f"gr_log10_p{tag}": m.get("log10_combined_p")}  # fmt: skip
            elif f.scheme == "hufunet":
                row |= {f"hufunet{tag}": f.verdict.value, f"acc_combined{tag}": m.get("acc_combined"),
                        f"diff_acc{tag}": m.get("diff_acc")}  # fmt: skip
    return row


@torch.no_grad()
def _change(owner: Any, suspect: Any) -> float:
    """The attention and MLP matrices' relative change, ||W' - W|| / ||W|| over all of them together."""
    pairs = zip(_matrices(owner), _matrices(suspect), strict=True)
    diff = sum(float((b.weight - a.weight).square().sum()) for (_, a), (_, b) in pairs)
    return round((diff / sum(float(m.weight.square().sum()) for _, m in _matrices(owner))) ** 0.5, 4)


def _num(x: float | None, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def main() -> None:
    """Run the removals, audit each, print the rows."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--quick", action="store_true", help="one setting of each removal")
    parser.add_argument("--only", default="", help="only the removals whose name contains this")
    args = parser.parse_args()
    torch.set_num_threads(1)
    from auditor.audit.inputs import load_inputs

    removals: list[tuple[str, Any]] = [("none (the owner's model)", copy.deepcopy)]
    for lr, steps in ((1e-4, 100), (1e-3, 100), (3e-3, 100), (1e-3, 300), (3e-3, 300), (1e-2, 300), (3e-2, 300)):
        removals.append((f"fine-tune lr {lr:g}, {steps} steps", lambda m, lr=lr, s=steps: _finetune(m, lr, s, 7)))
    removals.append(("fine-tune on counting down, lr 0.003, 300 steps", lambda m: _finetune(m, 3e-3, 300, 7, -1)))
    for lr, steps in ((1e-3, 100), (1e-2, 100), (1e-2, 300)):
        removals.append((f"LoRA r8 merged, lr {lr:g}, {steps} steps", lambda m, lr=lr, s=steps: _lora(m, lr, s, 7)))
    for scope in ("global", "per-layer"):
        for rate in (0.25, 0.5, 0.75, 0.9):
            removals.append((f"prune {scope} {rate:.0%}", lambda m, r=rate, sc=scope: _prune(m, r, sc)))
    removals.append(("int8 per-row round trip", _quantize))
    removals.append(("int4 per-row round trip", lambda m: _quantize(m, 4)))
    if args.quick:
        removals = [removals[i] for i in (0, 2, 10, 13, -2)]
    removals = [r for r in removals if args.only in r[0]]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        owner, gr_bundle, hufu_bundle = _owner(folder)
        bundles = [gr_bundle, hufu_bundle]
        inputs = {"alone": load_inputs(bundles=bundles, reference=None),
                  "reference": load_inputs(bundles=bundles, reference=folder / "owner")}  # fmt: skip
        for i, (name, removal) in enumerate(removals):
            suspect = removal(owner)
            rows.append({"removal": name, "weight_change": _change(owner, suspect),
                         **_audit(suspect, folder / f"suspect{i}", inputs)})  # fmt: skip
            print(json.dumps(rows[-1]), flush=True)
    print("| removal | weights moved | loss / accuracy | GR rate, log10 p (alone; --reference) |"
          " HufuNet Acc_c, DiffAcc (alone; --reference) | verdict (alone / --reference) |")  # fmt: skip
    for r in rows:
        gr = "; ".join(f"{r.get('gr' + t)} {_num(r.get('gr_rate' + t))}, {_num(r.get('gr_log10_p' + t), 1)}"
                       for t in ("_alone", ""))  # fmt: skip
        hufu = "; ".join(f"{r.get('hufunet' + t)} {_num(r.get('acc_combined' + t))}, {_num(r.get('diff_acc' + t))}"
                         for t in ("_alone", ""))  # fmt: skip
        print(f"| {r['removal']} | {r['weight_change']} | {r['loss']} / {r['accuracy']} | {gr} | {hufu} |"
              f" {r['verdict_alone']} / {r['verdict']} |")  # fmt: skip
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()

"""Evidence for restore-transformer on trained transformers (docs/restore.md, "Transformers").

For each architecture of ``--archs`` (Llama-style, GPT-2, BERT, ViT): trains one Greedy Residuals-marked
model (seed 0) and ``--innocents`` independently initialised and trained ones (seeds 1..N, no watermark).
The Llama-style decoder is the tests' (width 256, two blocks, 4 query heads in 2 key/value groups); GPT-2,
BERT and ViT have width 64, two blocks, 4 heads. Each trains 60 Adam steps: next-token prediction on
counting sequences (decoders), whether most of 16 tokens are below 32 (BERT), the digits' class with 2x2
patches of the 8x8 images (ViT). Every model is written as ``save_pretrained`` writes it. Then, against the
architecture's marked model as the reference:

* the owner's file as written and with every applicable edit composed (the positive control);
* every innocent, as trained and with every applicable edit composed (head-permute, mlp-permute,
  head-scale, then residual-rotate and rope-reorder for the Llama-style decoder, norm-fold for GPT-2 and
  ViT; BERT is post-norm), through every registered restorer and the Greedy Residuals detector: whether
  restore-transformer acted, the guard's score, the verdict without and with the reference;
* ``--finetuned`` stolen Llama copies, fine-tuned 20 to 200 steps on the same task (the thief's own seed)
  and then edited the same way: whether restore-transformer acted, the rotation's residual, the verdict
  before and after restore.

Prints one line per model and a summary per architecture; ``--json FILE`` writes the rows. One thread (the
machine is shared):

    OMP_NUM_THREADS=1 .venv/bin/python scripts/transformer_restore.py --innocents 20 --finetuned 4
    OMP_NUM_THREADS=1 .venv/bin/python scripts/transformer_restore.py --archs gpt2,bert,vit --finetuned 0
    OMP_NUM_THREADS=1 .venv/bin/python scripts/transformer_restore.py --archs vit --finetuned 0 --gr-readable
    OMP_NUM_THREADS=1 .venv/bin/python scripts/transformer_restore.py --onnx --innocents 5 --finetuned 0

``--onnx`` audits each model as an ONNX file that torch's dynamo exporter writes from it (the reference stays
the owner's ``save_pretrained`` folder).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path
from typing import Any

import torch

from auditor.errors import UsageError

ARCHITECTURES = ("llama", "gpt2", "bert", "vit")


#: ``--gr-readable``: ViT files under the modules' own names (see main).
READABLE = {"on": False}
#: ``--onnx``: every audited model written as torch's dynamo exporter writes it, not as safetensors.
ONNX = {"on": False}


def _build(arch: str) -> Any:
    """A model of ``arch`` from its ``transformers`` configuration: the Llama-style decoder of width 256 the
    tests use, and width-64 GPT-2 (counting), BERT (a synthetic two-class task) and ViT (digits, 2x2
    patches of the 8x8 images)."""
    import transformers as hf

    if arch == "llama":
        return hf.LlamaForCausalLM(hf.LlamaConfig(
            vocab_size=64, hidden_size=256, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False))  # fmt: skip
    if arch == "gpt2":
        return hf.GPT2LMHeadModel(hf.GPT2Config(vocab_size=64, n_positions=64, n_embd=64, n_layer=2, n_head=4,
                                                bos_token_id=0, eos_token_id=0))  # fmt: skip
    if arch == "bert":
        return hf.BertForSequenceClassification(hf.BertConfig(
            vocab_size=64, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
            max_position_embeddings=64, num_labels=2))  # fmt: skip
    return hf.ViTForImageClassification(hf.ViTConfig(
        image_size=8, patch_size=2, num_channels=1, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=96, num_labels=10))  # fmt: skip


def _loss(arch: str, model: Any, generator: torch.Generator) -> torch.Tensor:
    """One batch of ``arch``'s task: next-token prediction on counting sequences (decoders), whether most of
    16 tokens are below 32 (BERT), the digits' class (ViT)."""
    cross_entropy = torch.nn.functional.cross_entropy
    if arch in ("llama", "gpt2"):
        seq = (torch.randint(0, 64, (32, 1), generator=generator) + torch.arange(17)) % 64
        return cross_entropy(model(seq[:, :-1]).logits.reshape(-1, 64), seq[:, 1:].reshape(-1))
    if arch == "bert":
        seq = torch.randint(0, 64, (32, 16), generator=generator)
        return cross_entropy(model(input_ids=seq).logits, ((seq < 32).sum(1) > 8).long())
    from auditor.toolkit.data import digits

    images, labels = digits().train.tensors
    pick = torch.randint(0, len(labels), (32,), generator=generator)
    return cross_entropy(model(pixel_values=images[pick]).logits, labels[pick])


def _train(seed: int, marked: bool, steps: int = 60, start: dict[str, torch.Tensor] | None = None,
           arch: str = "llama") -> Any:  # fmt: skip
    from cryptography.hazmat.primitives.asymmetric import ed25519

    from auditor.plugins.greedy_residuals.owner import GreedyResidualsWatermark

    torch.manual_seed(seed)
    model = _build(arch)
    if start is not None:
        model.load_state_dict(start, strict=False)
    key = ed25519.Ed25519PrivateKey.from_private_bytes(bytes(range(32, 64)))
    wm = GreedyResidualsWatermark.create(model, private_key=key, message="(c) L") if marked else None
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3 if start is None else 1e-3)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        loss = _loss(arch, model, generator)
        if wm is not None:
            loss = loss + wm.penalty(model)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model, wm


def _composed(state: dict[str, torch.Tensor], layout: Any, seed: int) -> dict[str, torch.Tensor]:
    """Every transformer edit that applies to the layout, composed: head-permute, mlp-permute, head-scale,
    then residual-rotate and rope-reorder (RMSNorm rotary decoders) or norm-fold (pre-norm LayerNorm models;
    a post-norm BERT has nothing to fold into)."""
    from auditor.toolkit import transformers as tt

    state = tt.permute_heads(state, layout, seed=seed)[0]
    state = tt.permute_mlp(state, layout, seed=seed + 1)[0]
    state = tt.scale_heads(state, layout, seed=seed + 2)
    try:
        state = tt.rotate_residual(state, layout, seed=seed + 3)[0]
        return tt.rope_reorder(state, layout)
    except UsageError:
        pass
    try:
        return tt.fold_norms(state, layout)[0]
    except UsageError:
        return state


def _audit(state: dict[str, torch.Tensor], folder: Path, name: str, reference: Any, bundle: Any) -> dict[str, Any]:
    from safetensors.torch import save_file

    from auditor.audit.load import load_model
    from auditor.audit.restore import run_restorers
    from auditor.plugins.greedy_residuals.detector import GreedyResidualsDetector

    path = folder / f"{name}.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    if ONNX["on"]:
        path = _onnx(path, reference.path if reference.path.is_dir() else reference.path.parent)
    suspect = load_model(path)
    detector = GreedyResidualsDetector()
    (before,) = detector.detect(suspect, bundle=bundle, context={})
    restored, log = run_restorers(suspect, reference)
    (after,) = detector.detect(restored, bundle=bundle, context={})
    entry = next(e.get("log", {"acted": False, "reason": e.get("error")}) for e in log
                 if e["restorer"] == "restore-transformer")  # fmt: skip
    rotation = next((s for s in entry.get("steps", []) if s["step"] == "rotation"), {})
    return {
        "model": name, "acted": entry["acted"], "guard_score": (entry.get("evidence") or {}).get("score"),
        "rotation_residual": rotation.get("residual_after"), "reason": entry.get("reason"),
        "others_acted": [e["restorer"] for e in log
        if e.get("log", {}).get("acted") and e["restorer"] != "restore-transformer"],
        "errors": [f"{e['restorer']}: {e['error']}" for e in log if e.get("status") == "error"],
        "before": before.verdict.value, "after": after.verdict.value,
        "log10_p_before": before.metrics.get("log10_combined_p"),
        "log10_p_after": after.metrics.get("log10_combined_p"),
    }  # fmt: skip


def _onnx(weights: Path, owner: Path) -> Path:
    """The model of ``weights`` (a state dict in the owner's architecture, ``owner``'s config.json) exported
    with torch's dynamo exporter (a fixed-length input: 16 tokens, or one 8x8 image), as a thief would ship it."""
    import contextlib
    import io
    import shutil
    import warnings

    import transformers as hf

    folder = weights.with_suffix("")
    folder.mkdir(exist_ok=True)
    shutil.copy(owner / "config.json", folder / "config.json")
    weights.rename(folder / "model.safetensors")
    config = hf.AutoConfig.from_pretrained(folder)
    model = getattr(hf, config.architectures[0]).from_pretrained(folder).eval()
    ids = torch.arange(16).reshape(1, 16) % 64
    kwargs: dict[str, Any] = (
        {"pixel_values": torch.zeros(1, 1, 8, 8)} if config.model_type == "vit" else {"input_ids": ids}
    )
    if config.model_type in ("llama", "gpt2"):
        kwargs["use_cache"] = False
    path = folder.with_suffix(".onnx")
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (), str(path), dynamo=True, kwargs=kwargs)
    shutil.rmtree(folder)
    return path


def _saved(model: Any, out: Path) -> dict[str, torch.Tensor]:
    """``model`` as ``save_pretrained`` writes it (the names a thief's file has: a tied head left out,
    transformers 5's legacy ViT names)."""
    from safetensors.torch import load_file, save_file

    if READABLE["on"] and "vit" in type(model).__name__.lower():
        model.config.save_pretrained(out)
        save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(out / "model.safetensors"))
    else:
        model.save_pretrained(out)
    return load_file(str(out / "model.safetensors"))


def _owner(arch: str, folder: Path) -> tuple[Any, Any, Any, dict[str, torch.Tensor]]:
    """The Greedy Residuals-marked model of ``arch`` (seed 0), saved: its bundle, the reference, the layout
    and the state dict."""
    from auditor.audit.load import load_model
    from auditor.bundle import load_bundle
    from auditor.toolkit import transformers as tt

    owner, wm = _train(0, marked=True, arch=arch)
    out = folder / f"{arch}-owner"
    state = _saved(owner, out)
    wm.save_bundle(out / "owner_bundle.json", owner, model_file=out / "model.safetensors")
    layout = tt.layout_of(state, tt.read_config(out))
    return load_bundle(out / "owner_bundle.json"), load_model(out), layout, state


def main() -> None:
    """Run the evidence and print it."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", default=",".join(ARCHITECTURES), help="comma-separated, of " + ", ".join(
        ARCHITECTURES))  # fmt: skip
    parser.add_argument("--innocents", type=int, default=20)
    parser.add_argument("--finetuned", type=int, default=4, help="stolen Llama copies")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument(
        "--gr-readable",
        action="store_true",
        help=(
            "GPT-2 with an untied LM head and ViT saved under its modules' names, so that the Greedy Residuals owner"
            " is found in its own file (Greedy Residuals' default rule marks only the tied LM head of GPT-2, which"
            " save_pretrained leaves out; transformers 5 writes ViT under legacy names the bundle does not use)"
        ),
    )
    parser.add_argument("--onnx", action="store_true", help=(
        "audit every model as an ONNX file written by torch's dynamo exporter (the reference stays the owner's"
        " save_pretrained folder)"))  # fmt: skip
    args = parser.parse_args()
    READABLE["on"] = args.gr_readable
    ONNX["on"] = args.onnx
    torch.set_num_threads(1)
    archs = [a for a in args.archs.split(",") if a]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for arch in archs:
            bundle, reference, layout, state = _owner(arch, folder)
            for kind, s in (("plain", state), ("edited", _composed(state, layout, 99))):  # the positive control
                rows.append({"arch": arch, "kind": f"owner-{kind}", **_audit(s, folder, f"{arch}-owner-{kind}",
                                                                             reference, bundle)})  # fmt: skip
                print(rows[-1], flush=True)
            for seed in range(1, args.innocents + 1):
                model, _ = _train(seed, marked=False, arch=arch)
                plain = _saved(model, folder / f"{arch}-innocent{seed}")
                for kind, s in (("plain", plain), ("edited", _composed(plain, layout, seed))):
                    rows.append({"arch": arch, "kind": f"innocent-{kind}", **_audit(
                        s, folder, f"{arch}-innocent{seed}-{kind}", reference, bundle)})  # fmt: skip
                    print(rows[-1], flush=True)
            if arch != "llama":
                continue
            for i in range(args.finetuned):
                steps = (20, 50, 100, 200)[i % 4]
                model, _ = _train(100 + i, marked=False, steps=steps, start=state)
                tuned = _saved(model, folder / f"stolen{i}")
                rows.append({"arch": arch, "kind": f"stolen-finetuned-{steps}", **_audit(
                    _composed(tuned, layout, 100 + i), folder, f"stolen{i}", reference, bundle)})  # fmt: skip
                print(rows[-1], flush=True)
    for arch in archs:
        innocent = [r for r in rows if r["arch"] == arch and r["kind"].startswith("innocent")]
        scores = sorted(r["guard_score"] for r in innocent if r["guard_score"] is not None)
        spread = f"{scores[0]:.4f}/{statistics.median(scores):.4f}/{scores[-1]:.4f}" if scores else "none"
        print(f"{arch} innocents: {len(innocent)} audits of {len(innocent) // 2} models, restore-transformer acted"
              f" on {sum(r['acted'] for r in innocent)}, other restorers acted on "
              f"{sum(bool(r['others_acted']) for r in innocent)}, claimed without reference "
              f"{sum(r['before'] == 'detected' for r in innocent)}, with reference "
              f"{sum(r['after'] == 'detected' for r in innocent)}, guard score min/median/max {spread}")  # fmt: skip
    for r in rows:
        if r["kind"].startswith(("owner", "stolen")):
            print(
                f"{r['arch']} {r['kind']}: acted {r['acted']}, rotation residual {r['rotation_residual']}, "
                f"{r['before']} ({r['log10_p_before']}) -> {r['after']} ({r['log10_p_after']})"
                f", guard {r['guard_score']}"
            )
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()

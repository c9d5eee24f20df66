"""Evidence for restore-transformer on trained Llama-style decoders (docs/restore.md, "Transformers").

Trains one Greedy Residuals-marked decoder (width 256, two blocks, 4 query heads in 2 key/value groups, 60
steps on a counting task, as the tests do) and ``--innocents`` independently initialised and trained ones
(seeds 1..N, no watermark). Then, against the marked one as the reference:

* every innocent, as trained and with every edit composed (head-permute, mlp-permute, head-scale,
  residual-rotate, rope-reorder), through every registered restorer and the Greedy Residuals detector:
  whether restore-transformer acted, the guard's score, the verdict;
* ``--finetuned`` stolen copies, fine-tuned 20 to 200 steps on the same task (the thief's own seed) and
  then edited the same way: whether restore-transformer acted, the rotation's residual, the verdict
  before and after restore.

Prints one line per model and a summary; ``--json FILE`` writes the rows. One thread (the machine is
shared):

    OMP_NUM_THREADS=1 .venv/bin/python scripts/transformer_restore.py --innocents 20 --finetuned 4
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

import torch


def _train(seed: int, marked: bool, steps: int = 60, start: dict[str, torch.Tensor] | None = None) -> Any:
    from cryptography.hazmat.primitives.asymmetric import ed25519
    from transformers import LlamaConfig, LlamaForCausalLM

    from auditor.plugins.greedy_residuals.owner import GreedyResidualsWatermark

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=64, hidden_size=256, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=False)  # fmt: skip
    model = LlamaForCausalLM(config)
    if start is not None:
        model.load_state_dict(start, strict=False)
    key = ed25519.Ed25519PrivateKey.from_private_bytes(bytes(range(32, 64)))
    wm = GreedyResidualsWatermark.create(model, private_key=key, message="(c) L") if marked else None
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3 if start is None else 1e-3)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        seq = (torch.randint(0, 64, (32, 1), generator=generator) + torch.arange(17)) % 64
        loss = torch.nn.functional.cross_entropy(model(seq[:, :-1]).logits.reshape(-1, 64), seq[:, 1:].reshape(-1))
        if wm is not None:
            loss = loss + wm.penalty(model)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model, wm


def _composed(state: dict[str, torch.Tensor], layout: Any, seed: int) -> dict[str, torch.Tensor]:
    from auditor.toolkit import transformers as tt

    state = tt.permute_heads(state, layout, seed=seed)[0]
    state = tt.permute_mlp(state, layout, seed=seed + 1)[0]
    state = tt.scale_heads(state, layout, seed=seed + 2)
    state = tt.rotate_residual(state, layout, seed=seed + 3)[0]
    return tt.rope_reorder(state, layout)


def _audit(state: dict[str, torch.Tensor], folder: Path, name: str, reference: Any, bundle: Any) -> dict[str, Any]:
    from safetensors.torch import save_file

    from auditor.audit.load import load_model
    from auditor.audit.restore import run_restorers
    from auditor.plugins.greedy_residuals.detector import GreedyResidualsDetector

    path = folder / f"{name}.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    suspect = load_model(path)
    detector = GreedyResidualsDetector()
    (before,) = detector.detect(suspect, bundle=bundle, context={})
    restored, log = run_restorers(suspect, reference)
    (after,) = detector.detect(restored, bundle=bundle, context={})
    entry = next(e["log"] for e in log if e["restorer"] == "restore-transformer")
    rotation = next((s for s in entry.get("steps", []) if s["step"] == "rotation"), {})
    return {
        "model": name, "acted": entry["acted"], "guard_score": (entry.get("evidence") or {}).get("score"),
        "rotation_residual": rotation.get("residual_after"), "others_acted": [e["restorer"] for e in log
        if e["log"].get("acted") and e["restorer"] != "restore-transformer"],
        "before": before.verdict.value, "after": after.verdict.value,
        "log10_p_before": before.metrics.get("log10_combined_p"),
        "log10_p_after": after.metrics.get("log10_combined_p"),
    }  # fmt: skip


def main() -> None:
    """Run the evidence and print it."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--innocents", type=int, default=20)
    parser.add_argument("--finetuned", type=int, default=4)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    from auditor.audit.load import load_model
    from auditor.bundle import load_bundle
    from auditor.toolkit import transformers as tt

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        owner, wm = _train(0, marked=True)
        owner.save_pretrained(folder / "owner")
        wm.save_bundle(folder / "owner" / "owner_bundle.json", owner, model_file=folder / "owner" / "model.safetensors")
        bundle = load_bundle(folder / "owner" / "owner_bundle.json")
        reference = load_model(folder / "owner")
        state = {k: v.detach().clone() for k, v in owner.state_dict().items()}
        layout = tt.layout_of(state, tt.read_config(folder / "owner"))
        for seed in range(1, args.innocents + 1):
            model, _ = _train(seed, marked=False)
            plain = {k: v.detach().clone() for k, v in model.state_dict().items()}
            for kind, s in (("plain", plain), ("edited", _composed(plain, layout, seed))):
                rows.append({"kind": f"innocent-{kind}", **_audit(s, folder, f"innocent{seed}-{kind}", reference,
                                                                   bundle)})  # fmt: skip
                print(rows[-1], flush=True)
        for i in range(args.finetuned):
            steps = (20, 50, 100, 200)[i % 4]
            model, _ = _train(100 + i, marked=False, steps=steps, start=state)
            tuned = {k: v.detach().clone() for k, v in model.state_dict().items()}
            rows.append({"kind": f"stolen-finetuned-{steps}", **_audit(_composed(tuned, layout, 100 + i), folder,
                                                                      f"stolen{i}", reference, bundle)})  # fmt: skip
            print(rows[-1], flush=True)
    innocent = [r for r in rows if r["kind"].startswith("innocent")]
    scores = [r["guard_score"] for r in innocent if r["guard_score"] is not None]
    print(f"innocents: {len(innocent)} audits, restore-transformer acted on {sum(r['acted'] for r in innocent)},"
          f" claimed {sum(r['after'] == 'detected' for r in innocent)}, guard score max "
          f"{max(scores) if scores else None}")  # fmt: skip
    for r in rows:
        if r["kind"].startswith("stolen"):
            print(
                f"{r['kind']}: acted {r['acted']}, rotation residual {r['rotation_residual']}, "
                f"{r['before']} ({r['log10_p_before']:.2f}) -> {r['after']} ({r['log10_p_after']:.2f})"
            )
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()

"""The lineage test's evidence (docs/lineage.md): derived suspects and independently trained models.

    OMP_NUM_THREADS=1 python scripts/lineage_evidence.py [--count 30] [--json lineage_evidence.json]

Every model is trained here from a fixed seed on the 8x8 digits and audited through the real pipeline
(``load_inputs`` / ``audit_suspect``: restore against the reference, then every detector), so the figures are
what ``auditor audit SUSPECT --reference REFERENCE`` says. Three parts:

* **Independent models**: ``--count`` models per architecture (SmallCNN, SmallResNet, TinyViT), each from its
  own seed with the reference's recipe, against a reference trained from seed 0: how many the test calls
  derived at the default threshold (0.001), with the one-sided 95% Clopper-Pearson bound on that rate.
* **Derived suspects**: the reference after each registered function-preserving attack; heavy
  fine-tuning (Adam, lr 0.05 annealed to zero, 20 epochs) of a HufuNet owner's model, with HufuNet's own
  verdict beside it; structured pruning (25% of the filters) plus 5 epochs of fine-tuning; 80/20 and 50/50
  weight averages with an independent model; re-embedding Greedy Residuals with an adversary's key over
  the owner's; a suspect that kept the reference's first blocks and retrained the rest (per-layer answers).
* **Distillation**: a fresh model trained on the reference's outputs, reported as it comes out (not derived).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import json
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from auditor.audit.calibration import clopper_pearson_upper
from auditor.audit.pipeline import audit_suspect, load_inputs
from auditor.findings import Finding
from auditor.plugin_manager import registered
from auditor.plugins.lineage.detector import DEFAULT_ALPHA
from auditor.toolkit import data as datasets
from auditor.toolkit import models as zoo
from auditor.toolkit import training

ARCHS = ("cnn", "resnet", "vit")
RECIPES = {
    "cnn": training.TrainConfig(epochs=8, lr=1e-2),
    "resnet": training.TrainConfig(epochs=8, lr=1e-2),
    "vit": training.TrainConfig(epochs=20, lr=1e-3),
}
DATA = datasets.digits(split_seed=0)


def build(arch: str, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return zoo.TinyViT() if arch == "vit" else zoo.build(arch)


def fit(model: nn.Module, arch: str, seed: int, **changes: Any) -> nn.Module:
    training.train(model, DATA.train, dataclasses.replace(RECIPES[arch], seed=seed, **changes))
    return model.eval()


def save(model: nn.Module | dict[str, torch.Tensor], path: Path) -> Path:
    state = model.state_dict() if isinstance(model, nn.Module) else model
    save_file({k: v.detach().contiguous() for k, v in state.items()}, str(path))
    return path


def audit(suspect: Path, reference: Path, bundles: Sequence[Path] = ()) -> dict[str, Any]:
    """The lineage finding (and any watermark finding) of ``suspect`` audited against ``reference``."""
    record = audit_suspect(suspect, load_inputs(bundles=list(bundles), reference=reference))
    lineage: Finding = next(f for f in record.findings if f.detector == "lineage")
    return {
        "lineage": lineage.verdict.value, "p": lineage.metrics.get("p"),
        "derived_layers": [r["name"] for r in lineage.details.get("layers", []) if r.get("derived")],
        "not_derived_layers": [r["name"] for r in lineage.details.get("layers", []) if not r.get("derived")],
        "untested": [u["name"] for u in lineage.details.get("untested", [])],
        "restored": bool(lineage.metrics.get("restored")),
        "watermark": {f.detector: f.verdict.value for f in record.findings if f.scheme},
        "verdict": record.verdict.value, "exit_code": record.exit_code,
    }  # fmt: skip


def attack(attack_id: str, model: Path, out: Path, **options: Any) -> Path:
    registered("attacks")[attack_id].component.apply(model, out, options=options)  # type: ignore[attr-defined]
    return out


def independents(folder: Path, count: int, log: Callable[[str], None]) -> dict[str, Any]:
    """``count`` independently trained models per architecture against each architecture's reference."""
    results: dict[str, Any] = {}
    for arch in ARCHS:
        reference = save(fit(build(arch, 0), arch, 0), folder / f"{arch}_reference.safetensors")
        rows = []
        for seed in range(1, count + 1):
            started = time.perf_counter()
            path = save(fit(build(arch, 1000 + seed), arch, 1000 + seed), folder / f"{arch}_independent.safetensors")
            row = audit(path, reference) | {"seed": 1000 + seed, "seconds": round(time.perf_counter() - started, 1)}
            rows.append(row)
            log(f"{arch} independent {seed}/{count}: {row['lineage']} p={row['p']:.4g} restored={row['restored']}")
        called = sum(r["lineage"] == "detected" for r in rows)
        results[arch] = {
            "count": count, "called_derived": called, "fpr_upper_95": clopper_pearson_upper(called, count),
            "called_at_0.01": sum(r["p"] <= 0.01 for r in rows),
            "smallest_p": min(r["p"] for r in rows), "restored": sum(r["restored"] for r in rows), "rows": rows,
        }  # fmt: skip
    return results


def averaged(reference: nn.Module, other: nn.Module, share: float) -> dict[str, torch.Tensor]:
    """``share`` of the reference's weights plus the rest of the independent model's (every float tensor)."""
    theirs = other.state_dict()
    return {
        k: share * v + (1 - share) * theirs[k] if v.is_floating_point() else v
        for k, v in reference.state_dict().items()
    }  # fmt: skip


def derived(folder: Path, log: Callable[[str], None]) -> dict[str, Any]:
    """Every derived suspect, audited against its reference."""
    out: dict[str, Any] = {}

    def note(name: str, row: dict[str, Any]) -> None:
        out[name] = row
        log(f"{name}: lineage {row['lineage']} p={row['p']} watermark {row['watermark']} restored={row['restored']}"
            f" derived layers {row['derived_layers']} not {row['not_derived_layers']}")  # fmt: skip

    for arch in ("cnn", "resnet"):
        ref_model = fit(build(arch, 0), arch, 0)
        reference = save(ref_model, folder / f"{arch}_ref.safetensors")
        for attack_id, reg in registered("attacks").items():
            component: Any = reg.component
            if not component.function_preserving or attack_id.startswith("forge"):
                continue
            suffix = ".onnx" if attack_id == "onnx-export" else ".safetensors"
            try:
                path = attack(attack_id, reference, folder / f"{arch}_{attack_id}{suffix}", seed=1)
            except Exception as exc:  # an attack that does not apply to this architecture is recorded, not fatal
                out[f"{arch} {attack_id}"] = {"error": f"{type(exc).__name__}: {exc}"}
                log(f"{arch} {attack_id}: attack failed: {exc}")
                continue
            note(f"{arch} {attack_id}", audit(path, reference))
        pruned = attack("prune-channels", reference, folder / f"{arch}_pruned.safetensors", rate=0.25, seed=1)
        note(
            f"{arch} prune-channels 25% + fine-tune 5 epochs",
            audit(attack("fine-tune", pruned, folder / f"{arch}_pruned_ft.safetensors", epochs=5, seed=1), reference),
        )
        note(
            f"{arch} fine-tune-anneal Adam lr 0.05",
            audit(
                attack("fine-tune-anneal", reference, folder / f"{arch}_anneal.safetensors", optimizer="adam", seed=1),
                reference,
            ),
        )
        other = fit(build(arch, 77), arch, 77)
        for share in (0.8, 0.5, 0.2):
            path = save(averaged(ref_model, other, share), folder / f"{arch}_avg{share}.safetensors")
            note(f"{arch} average {round(share * 100)}/{round(100 - share * 100)} (reference/independent)",
                 audit(path, reference))  # fmt: skip
        student = build(arch, 99)
        distill(ref_model, student, arch)
        note(f"{arch} distilled into a fresh model", audit(save(student, folder / f"{arch}_student.safetensors"),
                                                            reference))  # fmt: skip
    ref_model = fit(build("resnet", 0), "resnet", 0)
    kept = build("resnet", 55)
    kept.stem.load_state_dict(ref_model.stem.state_dict())
    kept.bn.load_state_dict(ref_model.bn.state_dict())
    kept.layer1.load_state_dict(ref_model.layer1.state_dict())
    note(
        "resnet kept stem and layer1, retrained layer2 and head",
        audit(save(fit(kept, "resnet", 55), folder / "kept.safetensors"), folder / "resnet_ref.safetensors"),
    )
    ref_vit = fit(build("vit", 0), "vit", 0)
    vit_ref = save(ref_vit, folder / "vit_ref.safetensors")
    note("vit fine-tune lr 0.05 sgd 10 epochs", audit(save(fit(copy.deepcopy(ref_vit), "vit", 3, lr=0.05,
         optimizer="sgd", epochs=10), folder / "vit_ft.safetensors"), vit_ref))  # fmt: skip
    other = fit(build("vit", 77), "vit", 77)
    for share in (0.8, 0.5):
        note(
            f"vit average {round(share * 100)}/{round(100 - share * 100)} (reference/independent)",
            audit(save(averaged(ref_vit, other, share), folder / f"vit_avg{share}.safetensors"), vit_ref),
        )
    student = build("vit", 99)
    distill(ref_vit, student, "vit")
    note("vit distilled into a fresh model", audit(save(student, folder / "vit_student.safetensors"), vit_ref))
    out.update(watermarked(folder, log))
    return out


def distill(teacher: nn.Module, student: nn.Module, arch: str, epochs: int = 20) -> None:
    """Train ``student`` from its own initialisation on the teacher's soft outputs (temperature 2)."""
    images = DATA.train.tensors[0]
    with torch.no_grad():
        soft = torch.softmax(teacher(images) / 2, dim=1)
    optimizer = torch.optim.Adam(student.parameters(), lr=RECIPES[arch].lr)
    generator = torch.Generator().manual_seed(0)
    student.train()
    for _ in range(epochs):
        order = torch.randperm(len(images), generator=generator)
        for start in range(0, len(images), 64):
            idx = order[start : start + 64]
            loss = nn.functional.kl_div(torch.log_softmax(student(images[idx]) / 2, dim=1), soft[idx],
                                        reduction="batchmean")  # fmt: skip
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    student.eval()


def watermarked(folder: Path, log: Callable[[str], None]) -> dict[str, Any]:
    """A HufuNet owner's model after heavy fine-tuning and after pruning plus fine-tuning; a Greedy Residuals
    owner's model re-marked by an adversary: the watermark's verdict and the lineage test's, side by side."""
    from cryptography.hazmat.primitives.asymmetric import ed25519

    from auditor.plugins.greedy_residuals.owner import GreedyResidualsWatermark
    from auditor.plugins.hufunet.embedder import embed_hufunet
    from auditor.plugins.hufunet.generate import generate_hufunet

    out: dict[str, Any] = {}
    secret = folder / "hufunet_secret.json"
    generate_hufunet(out=secret, seed=0, hmac_key=hashlib.sha256(b"lineage evidence: the HufuNet owner's key").digest())
    embed_hufunet(hufunet=secret, out_dir=folder / "hufunet_owner", epochs=12, seed=0, device="cpu")
    owner, bundle = folder / "hufunet_owner" / "model.safetensors", folder / "hufunet_owner" / "owner_bundle.json"
    for name, path in (
        ("hufunet owner as released", owner),
        ("hufunet owner fine-tune-anneal Adam lr 0.05", attack("fine-tune-anneal", owner,
                                                               folder / "hf_anneal.safetensors", optimizer="adam",
                                                               seed=1)),
        ("hufunet owner prune-channels 25% + fine-tune 5 epochs", attack(
            "fine-tune", attack("prune-channels", owner, folder / "hf_pruned.safetensors", rate=0.25, seed=1),
            folder / "hf_pruned_ft.safetensors", epochs=5, seed=1)),
    ):  # fmt: skip
        out[name] = row = audit(path, owner, [bundle])
        log(f"{name}: watermark {row['watermark']} lineage {row['lineage']} p={row['p']}")
    key = ed25519.Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
    model = build("cnn", 0)
    wm = GreedyResidualsWatermark.create(model, private_key=key, message="(c) the owner")
    training.train(model, DATA.train, training.TrainConfig(epochs=8, lr=1e-2, seed=0), penalty=wm.penalty)
    model.eval()
    files = training.save_model(model, folder / "gr_owner", "model")
    gr_bundle = folder / "gr_owner" / "owner_bundle.json"
    wm.save_bundle(gr_bundle, model, model_file=files["safetensors"], architecture="cnn")
    over = attack("overwrite-gr", files["safetensors"], folder / "gr_over.safetensors", seed=1)
    out["greedy residuals owner re-marked by an adversary (overwrite-gr)"] = row = audit(
        over, files["safetensors"], [gr_bundle]
    )
    log(f"overwrite-gr: watermark {row['watermark']} lineage {row['lineage']} p={row['p']}")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=30, help="independent models per architecture")
    parser.add_argument("--json", type=Path, default=None, help="write every row here")
    parser.add_argument("--skip-derived", action="store_true", help="only the independent models")
    parser.add_argument("--only-watermarked", action="store_true", help="only the watermark owners' suspects")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    started = time.perf_counter()

    def log(line: str) -> None:
        print(f"[{time.perf_counter() - started:7.1f}s] {line}", file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        if args.only_watermarked:
            results = {"derived": watermarked(folder, log), "independent": {}}
        else:
            results = {"derived": {} if args.skip_derived else derived(folder, log),
                       "independent": independents(folder, args.count, log)}  # fmt: skip
    print(
        f"| architecture | independent models | called derived (p <= {DEFAULT_ALPHA:g}) | false-positive rate, 95%"
        " upper bound | smallest p | p <= 0.01 | restored by the guard |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for arch, r in results["independent"].items():
        print(
            f"| {arch} | {r['count']} | {r['called_derived']} | {r['fpr_upper_95']:.2%} | {r['smallest_p']:.3g} |"
            f" {r['called_at_0.01']} | {r['restored']} |"
        )
    print("\n| derived suspect | lineage | p | watermark | restored | layers not derived |")
    print("|---|---|---:|---|---|---|")
    for name, r in results["derived"].items():
        if "error" in r:
            print(f"| {name} | attack failed: {r['error']} | | | | |")
            continue
        wm = ", ".join(f"{k} {v}" for k, v in r["watermark"].items()) or "none given"
        print(
            f"| {name} | {r['lineage']} | {r['p']:.3g} | {wm} | {'yes' if r['restored'] else 'no'} |"
            f" {', '.join(r['not_derived_layers']) or '—'} |"
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=str))
    log("done")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

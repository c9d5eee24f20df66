"""HufuNet against fine-tuning and pruning at digits scale: prints the Markdown table in docs/hufunet.md.

Generates the default HufuNet (seed 0), embeds it in the default host (SmallCNN
width 2, 20 epochs), then attacks copies of the released model: magnitude
pruning of every convolution (per layer) at 10%-95%, and fine-tuning of all
layers (EPH unfrozen) on the training split for 10 epochs at three learning
rates, the largest being the "large rate, then anneal" attack (cosine).

    python scripts/hufunet_robustness.py [--out DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

from auditor.bundle import load_bundle
from auditor.plugins.hufunet.detector import audit_bundle
from auditor.plugins.hufunet.embedder import embed_hufunet
from auditor.plugins.hufunet.generate import generate_hufunet
from auditor.toolkit import data as datasets
from auditor.toolkit import models as zoo
from auditor.toolkit import training
from auditor.toolkit.models import model_graph


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="keep the owner's files here (default: a temp dir)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = args.out or Path(tempfile.mkdtemp(prefix="hufunet-robustness-"))
    out.mkdir(parents=True, exist_ok=True)
    key = hashlib.sha256(b"hufunet_robustness owner key").digest()  # fixed, so the figures repeat
    generate_hufunet(out=out / "secret.json", seed=0, overwrite=True, hmac_key=key)
    embed_hufunet(hufunet=out / "secret.json", out_dir=out / "owner", device="cpu", overwrite=True)
    bundle = load_bundle(out / "owner" / "owner_bundle.json")
    released = load_file(out / "owner" / "model.safetensors")
    data = datasets.digits()

    def stolen() -> torch.nn.Module:
        model = zoo.build("cnn", width=2)
        model.load_state_dict(released)
        return model

    def row(attack: str, model: torch.nn.Module) -> str:
        f = audit_bundle(model_graph(model), bundle, {})
        m = f.metrics
        return (f"| {attack} | {training.evaluate(model, data.test):.2%} | {m['acc_combined']:.2%} "
                f"| {m['diff_acc']:.3f} | {m['bit_identical_fraction']:.1%} | {f.verdict.value} |")  # fmt: skip

    print("| attack | host accuracy | Acc_combined | DiffAcc | EPH bit-identical | verdict |")
    print("|---|---:|---:|---:|---:|---|")
    print(row("none", stolen()))
    for rate in (0.1, 0.3, 0.5, 0.7, 0.8, 0.9, 0.95):
        model = stolen()
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() == 4:
                    p[p.abs() <= p.abs().flatten().kthvalue(int(rate * p.numel())).values] = 0.0
        print(row(f"magnitude pruning {rate:.0%} of every conv", model))
    for lr, schedule in ((1e-3, "constant"), (1e-2, "constant"), (5e-2, "cosine")):
        model = stolen()
        config = training.TrainConfig(epochs=10, lr=lr, seed=7, schedule=schedule)
        training.train(model, data.train, config)
        print(row(f"fine-tune all layers, Adam {lr:g} ({schedule}), 10 epochs", model))


if __name__ == "__main__":
    main()

"""Regenerates the measured table of docs/robustness.md: one model with both watermarks through the full grid.

The owner is the demo's (scripts/demo.py): SmallCNN width 2 on the bundled
digits, 20 epochs of Adam 1e-2, carrying Greedy Residuals (a fixed Ed25519
key) and HufuNet (seed 0, a placement key derived from the seed so that the
run repeats). ``auditor evaluate`` then runs the full grid against both
bundles with the released model as the restore reference.

    python scripts/robustness.py [--out DIR] [--write-docs]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import re
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs" / "robustness.md"
MESSAGE = "(c) 2026 Alice Example Labs. Digits classifier v1, all rights reserved."


#: The owners' recipes by architecture: (width, epochs); any other built-in gets (1, 20). HufuNet needs room in
#: the host (548 EPH kernels): the CNN at width 2 (10,272 kernels), the ResNet at width 1 (30,752); a host without
#: 3x3 kernels (the LSTM) carries Greedy Residuals alone.
OWNER_RECIPES = {"cnn": (2, 20), "resnet": (1, 8), "lstm": (1, 20)}


def make_owner(folder: Path, seed: int = 0, *, arch: str = "cnn", epochs: int | None = None) -> dict[str, Path]:
    """Train the owner of ``arch`` under ``folder`` (both watermarks where the host has room for HufuNet's
    3x3 kernels, Greedy Residuals alone elsewhere); return the released model (``model``, safetensors) and the bundles
    (``gr``, and ``hufunet`` where embedded). ``epochs`` defaults to the architecture's recipe."""
    from cryptography.hazmat.primitives.asymmetric import ed25519

    from auditor.errors import UsageError
    from auditor.plugins.greedy_residuals.owner import GreedyResidualsWatermark
    from auditor.plugins.hufunet.generate import generate_hufunet, load_hufunet
    from auditor.plugins.hufunet.owner import plant, write_bundle
    from auditor.toolkit import data as datasets
    from auditor.toolkit import models as zoo
    from auditor.toolkit import training

    width, default_epochs = OWNER_RECIPES.get(arch, (1, 20))
    folder.mkdir(parents=True, exist_ok=True)
    key = hashlib.sha256(f"owner placement key {seed}".encode()).digest()  # fixed, so the figures repeat
    generate_hufunet(out=folder / "hufunet_secret.json", seed=seed, overwrite=True, hmac_key=key)
    net, secret = load_hufunet(folder / "hufunet_secret.json")
    data = datasets.digits()
    torch.manual_seed(seed)
    model = zoo.build(arch, **({"width": width} if width != 1 else {}))
    signing = ed25519.Ed25519PrivateKey.from_private_bytes(hashlib.sha256(f"owner {seed}".encode()).digest())
    gr = GreedyResidualsWatermark.create(model, private_key=signing, message=MESSAGE)
    try:
        hufunet = plant(model, net, key)
    except UsageError:  # no 3x3 kernels, or too few: Greedy Residuals alone
        hufunet = None
    try:
        config = training.TrainConfig(epochs=epochs or default_epochs, lr=1e-2, seed=seed)
        training.train(model, data.train, config, penalty=gr.penalty,
                       after_step=hufunet.frozen.after_step if hufunet else None)  # fmt: skip
    finally:
        if hufunet is not None:
            hufunet.frozen.detach()
    model.eval()
    released = training.save_model(model, folder / "released", "model", overwrite=True)
    label = f"{arch}-width{width}" if width != 1 else arch
    gr.save_bundle(folder / "gr_bundle.json", model, model_file=released["safetensors"], architecture=label)
    bundles = {"gr": folder / "gr_bundle.json"}
    if hufunet is not None:
        write_bundle(folder / "hufunet_bundle.json", model, hufunet, net, secret, files=released, architecture=arch,
                     width=width if width != 1 else None)  # fmt: skip
        bundles["hufunet"] = folder / "hufunet_bundle.json"
    return {"model": released["safetensors"], **bundles}


def machine() -> str:
    """One line naming the machine, for the docs."""
    return (f"{len(os.sched_getaffinity(0))} CPU cores, {platform.system()} {platform.release()}, "
            f"Python {platform.python_version()}, torch {torch.__version__}")  # fmt: skip


def main() -> None:
    from auditor.plugins.attacks.evaluate import evaluate_model
    from auditor.plugins.attacks.render import markdown

    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="keep the owner and the evaluation here")
    parser.add_argument("--write-docs", action="store_true", help="write the table into docs/robustness.md")
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = args.out or Path(tempfile.mkdtemp(prefix="robustness-"))
    started = time.perf_counter()
    owner = make_owner(out / "owner")
    trained = time.perf_counter() - started
    results = evaluate_model(model=owner["model"], bundles=[owner["gr"], owner["hufunet"]], reference=owner["model"],
                             out_dir=out / "evaluation", progress=True, restart=True)  # fmt: skip
    table = markdown(results).split("\n", 2)[2].replace(str(out), "OUT")  # the docs page has its own title
    section = (f"Command: `python scripts/robustness.py --write-docs` ({machine()}): owner trained in "
               f"{trained:.0f} s, grid evaluated in {results['seconds_this_run']:.0f} s.\n\n{table}")  # fmt: skip
    print(section)
    if args.write_docs:
        text = DOCS.read_text()
        new = re.sub(r"(<!-- robustness:start -->\n).*?(<!-- robustness:end -->)",
                     lambda m: m.group(1) + section.strip() + "\n" + m.group(2), text, flags=re.S)  # fmt: skip
        DOCS.write_text(new)


if __name__ == "__main__":
    main()

"""Make the calibrations the built-in detectors ship (docs/calibration.md): their known error rates.

For each built-in scheme this trains the scheme's default owner exactly as `auditor embed` does by default
(a fixed key or HMAC key, seed 0, the built-in CNN on the bundled digits: Greedy Residuals on the width-1
CNN, HufuNet on the width-2 host), then runs

    auditor calibrate --bundle OWNER_BUNDLE --reference OWNER_MODEL --models FOLDER --train N ...

which trains N independent models of the same architecture from scratch by the same recipe without the
watermark (seeds 1000 to 1000 + N - 1), audits each against the owner bundle with the owner's released model
as the reference (the restore stage runs, as in an analyst's audit), and writes the null distribution of the
detector's deciding statistic to auditor/plugins/<scheme>/calibration/<architecture>.json, where the detector
finds it for any owner bundle naming that architecture.

Everything is seeded and runs on one CPU thread, so a second run on the same platform and torch version
gives the same files byte for byte (the models' SHA-256 included); other platforms may differ in the last
bits of the weights, not in what the calibration measures. With N = 60 it takes about 15 minutes on 2 CPUs:

    .venv/bin/python scripts/calibrate_builtins.py            # both schemes, 60 models each
    .venv/bin/python scripts/calibrate_builtins.py --models 5 --out /tmp/cal   # a quick look elsewhere

The owners and the trained models are kept under --work (default calibration-work/) for inspection.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import sys
import time
from pathlib import Path

import torch

#: Where each scheme's shipped calibrations live, and the file its default owner's architecture gets.
TARGETS = {
    "greedy-residuals": ("auditor/plugins/greedy_residuals/calibration", "cnn.json", "cnn", 1),
    "hufunet": ("auditor/plugins/hufunet/calibration", "cnn-width2.json", "cnn", 2),
}
MESSAGE = "(c) auditor calibration owner: the default Greedy Residuals owner of scripts/calibrate_builtins.py"
GR_KEY_SEED = b"auditor calibration: the Greedy Residuals owner's Ed25519 key"
HUFUNET_KEY_SEED = b"auditor calibration: the HufuNet owner's HMAC key"


def gr_owner(folder: Path) -> Path:
    """The default Greedy Residuals owner (embed's defaults, a fixed Ed25519 key); its folder."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    from auditor.plugins.greedy_residuals.embedder import embed_greedy_residuals

    key = ed25519.Ed25519PrivateKey.from_private_bytes(hashlib.sha256(GR_KEY_SEED).digest())
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())  # fmt: skip
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "owner_key.pem").write_bytes(pem)
    embed_greedy_residuals(key=folder / "owner_key.pem", message=MESSAGE, out_dir=folder, device="cpu")
    return folder


def hufunet_owner(folder: Path) -> Path:
    """The default HufuNet owner (generate and embed defaults, a fixed HMAC key); its folder."""
    from auditor.plugins.hufunet.embedder import embed_hufunet
    from auditor.plugins.hufunet.generate import generate_hufunet

    folder.mkdir(parents=True, exist_ok=True)
    secret = folder / "hufunet_secret.json"
    generate_hufunet(out=secret, seed=0, hmac_key=hashlib.sha256(HUFUNET_KEY_SEED).digest())
    embed_hufunet(hufunet=secret, out_dir=folder, device="cpu")
    return folder


def main(argv: list[str] | None = None) -> int:
    """Train the owners, then calibrate each scheme; print what was written."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=int, default=60, help="independent models per scheme (default 60)")
    parser.add_argument("--work", type=Path, default=Path("calibration-work"), help="owners and trained models")
    parser.add_argument("--out", type=Path, default=None, help="write the calibrations here instead of the package")
    parser.add_argument("--scheme", choices=sorted(TARGETS), action="append", help="only this scheme (repeatable)")
    args = parser.parse_args(argv)

    from auditor.cli.calibrate import make_calibration

    torch.set_num_threads(1)  # one thread: the same weights, bit for bit, on every run
    owners = {"greedy-residuals": gr_owner, "hufunet": hufunet_owner}
    for scheme in args.scheme or sorted(TARGETS):
        folder, file, arch, width = TARGETS[scheme]
        work = args.work / scheme
        if work.exists():
            shutil.rmtree(work)
        started = time.perf_counter()
        owner = owners[scheme](work / "owner")
        if args.out is None and not Path(folder).is_dir():
            parser.error("run it from the repository root (or give --out)")
        out = (args.out or Path(folder)) / file  # relative: the recorded command holds no checkout's path
        document, sha = make_calibration(
            bundle=work / "owner" / "owner_bundle.json", reference=work / "owner" / "model.safetensors",
            models=work / "models", out=out, train=args.models, arch=arch, width=width,
            name=f"{args.models} independent {arch} models (width {width}) trained on digits by the default recipe",
        )  # fmt: skip
        fp = document["detectors"][0]["false_positive_rate"]
        print(f"{scheme}: owner {owner}; {fp['false_positives']} of {fp['decided']} independent models detected"
              f" (95% upper bound {fp['upper_bound']:.2%}); wrote {out} sha256 {sha}"
              f" in {time.perf_counter() - started:.0f} s")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The main job on its built-in default (README: `make demo`): an ownership dispute, start to finish.

1. The owner makes a signing key and a secret HufuNet, then trains one model on
   the bundled digits carrying BOTH watermarks (Greedy Residuals and HufuNet)
   and releases it, keeping the two owner bundles.
2. A thief takes the released model, fine-tunes it on their own split, prunes
   20% of every convolution, permutes every channel (the model computes the
   same thing) and exports it to ONNX, which folds batch-norm into the
   convolutions and renames nothing the thief cares about.
3. An independent developer trains the same architecture from scratch: the
   innocent control.
4. The analyst audits both files with the `auditor` command line against the
   owner's bundles and the owner's released model as reference, and gets an
   HTML evidence report with a JSON twin for each. A hostile checkpoint that
   would run a command when unpickled is refused on the way.

Everything is written under demo-out/, which each run empties first (the owner's
secrets with mode 0600).
"""

from __future__ import annotations

import contextlib
import io
import shlex
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file

OUT = Path("demo-out")
AUDITOR = [sys.executable, "-m", "auditor"]
MESSAGE = "(c) 2026 Alice Example Labs. Digits classifier v1, all rights reserved."


def step(text: str) -> None:
    print(f"\n== {text}", flush=True)


def run(args: list[str], *, quiet: bool = False) -> subprocess.CompletedProcess[str]:
    """Run an auditor command as a user would, show it and its output."""
    shown = " ".join(shlex.quote(a) for a in ["auditor", *args])
    print(f"$ {shown}", flush=True)
    done = subprocess.run([*AUDITOR, *args], capture_output=True, text=True, check=False)
    if not quiet or done.returncode not in (0, 1, 3):
        for line in (done.stdout + done.stderr).strip().splitlines():
            print(f"  {line}")
    return done


def owner() -> Path:
    """Train the owner's model with both watermarks; return the folder of its files."""
    from auditor import keys
    from auditor.plugins.greedy_residuals.owner import GreedyResidualsWatermark
    from auditor.plugins.hufunet.generate import generate_hufunet, hmac_key, load_hufunet
    from auditor.plugins.hufunet.owner import plant, write_bundle
    from auditor.toolkit import data as datasets
    from auditor.toolkit import models as zoo
    from auditor.toolkit import training

    folder = OUT / "owner"
    step("Owner: a signing key, a secret HufuNet, one model trained with both watermarks")
    run(["keys", "new", "--out", str(folder / "keys"), "--algorithm", "ed25519"], quiet=True)
    summary = generate_hufunet(out=folder / "hufunet_secret.json", seed=0, overwrite=True)
    print(f"  HufuNet: {summary['eph_kernels']} EPH kernels, {summary['accuracy']:.2%} on the digits test split")
    net, secret = load_hufunet(folder / "hufunet_secret.json")
    data = datasets.digits()
    torch.manual_seed(0)
    model = zoo.build("cnn", width=2)
    private_key = keys.load_private_key(folder / "keys" / keys.PRIVATE_FILE)
    gr = GreedyResidualsWatermark.create(model, private_key=private_key, message=MESSAGE)
    del private_key
    hufunet = plant(model, net, hmac_key(secret))
    try:
        training.train(model, data.train, training.TrainConfig(epochs=20, lr=1e-2, seed=0),
                        penalty=gr.penalty, after_step=hufunet.frozen.after_step)  # fmt: skip
    finally:
        hufunet.frozen.detach()
    model.eval()
    released = training.save_model(model, folder / "released", "model", overwrite=True)
    gr.save_bundle(folder / "greedy_residuals_bundle.json", model, model_file=released["safetensors"],
                   architecture="cnn-width2")  # fmt: skip
    write_bundle(folder / "hufunet_bundle.json", model, hufunet, net, secret, files=released,
                 architecture="cnn", width=2)  # fmt: skip
    rates = ", ".join(f"{name} {rate:.0%}" for name, rate in gr.rates(model).items())
    print(f"  released model: {training.evaluate(model, data.test):.2%} test accuracy; "
          f"signature bits embedded: {rates}; EPH frozen bit-identical: {hufunet.frozen.intact()}")  # fmt: skip
    print(f"  released: {released['safetensors']}; owner bundles: {folder}/*_bundle.json (HufuNet's is secret)")
    return folder


def thief(released: Path) -> Path:
    """Fine-tune, prune, permute and export the released model; return the ONNX file."""
    from auditor.toolkit import data as datasets
    from auditor.toolkit import models as zoo
    from auditor.toolkit import training
    from auditor.toolkit.channels import tensors_of
    from auditor.toolkit.edits import permute

    step("Thief: fine-tune on their own data, prune 20%, permute every channel, export to ONNX")
    model = zoo.build("cnn", width=2)
    model.load_state_dict(load_file(released))
    theirs = datasets.digits(split_seed=7)
    training.train(model, theirs.train, training.TrainConfig(epochs=3, lr=1e-3, seed=7))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 4:
                p[p.abs() <= p.abs().flatten().kthvalue(int(0.2 * p.numel())).values] = 0.0
    model.eval()
    folder = OUT / "thief"
    folder.mkdir(parents=True, exist_ok=True)
    graph = zoo.model_graph(model)  # module order: conv1 -> bn1 -> conv2 ... (edges inferred from it)
    permuted, _ = permute(graph, tensors_of(graph), seed=7)
    state = {f"{layer}.{role}": t for layer, params in permuted.items() for role, t in params.items()}
    with torch.no_grad():
        before = model(theirs.test.tensors[0])
        model.load_state_dict({k: v.to(model.state_dict()[k].dtype) for k, v in state.items()})
        after = model(theirs.test.tensors[0])
    print(f"  accuracy after the attacks: {training.evaluate(model, theirs.test):.2%} on the thief's test split; "
          f"permutation changed the outputs by at most {float((before - after).abs().max()):.1e}")  # fmt: skip
    stolen = folder / "stolen.onnx"
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(1, 1, 8, 8),), str(stolen), dynamo=False)
    print(f"  stolen model: {stolen} (batch-norm folded into the convolutions by the exporter)")
    return stolen


def innocent() -> Path:
    """An independent model of the same architecture: the control."""
    from auditor.toolkit import data as datasets
    from auditor.toolkit import models as zoo
    from auditor.toolkit import training

    step("Control: an innocent developer trains the same architecture independently")
    torch.manual_seed(123)
    model = zoo.build("cnn", width=2)
    data = datasets.digits(split_seed=3)
    training.train(model, data.train, training.TrainConfig(epochs=10, lr=1e-2, seed=123))
    path = training.save_model(model.eval(), OUT / "innocent", "model", overwrite=True)["safetensors"]
    print(f"  innocent model: {path} ({training.evaluate(model, data.test):.2%} test accuracy)")
    return path


def hostile() -> Path:
    """A checkpoint that would run a shell command if it were unpickled with torch.load."""

    class Payload:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            import os

            return (os.system, (f"touch {OUT / 'PWNED'}",))

    path = OUT / "suspects" / "hostile.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    (OUT / "PWNED").unlink(missing_ok=True)
    torch.save({"conv1.weight": torch.zeros(2, 1, 3, 3), "extra": Payload()}, path)
    return path


def main() -> int:
    started = time.monotonic()
    shutil.rmtree(OUT, ignore_errors=True)  # the demo's own folder: every run starts from nothing
    OUT.mkdir()
    owner_dir = owner()
    reference = owner_dir / "released" / "model.safetensors"
    stolen = thief(reference)
    control = innocent()
    bundles = ["--bundle", str(owner_dir / "greedy_residuals_bundle.json"),
               "--bundle", str(owner_dir / "hufunet_bundle.json")]  # fmt: skip

    step("Analyst: audit each suspect against the owner's bundles, restoring against the released model")
    verdicts = {}
    for name, suspect in (("stolen", stolen), ("innocent", control)):
        report = OUT / "reports" / f"{name}.html"
        done = run(["audit", str(suspect), *bundles, "--reference", str(reference), "--case-id", "DEMO-2026-001",
                    "--analyst", "Demo Analyst", "--out", str(report),
                    "--json-out", str(report.with_suffix(".json"))])  # fmt: skip
        verdicts[name] = done.returncode
    done = run(["report", "verify", str(OUT / "reports" / "stolen.json")])
    step("Analyst: a hostile checkpoint is refused, and what it hid never runs")
    refused = run(["inspect", str(hostile())])
    ran = (OUT / "PWNED").exists()
    print(f"  exit code {refused.returncode}; the hidden command {'RAN (a bug!)' if ran else 'did not run'}")

    step("Outcome")
    meaning = {0: "watermark found", 1: "no watermark found", 3: "inconclusive"}
    for name, code in verdicts.items():
        print(f"  {name:9s} exit {code}: {meaning.get(code, 'error')}")
    print(f"  reports: {OUT / 'reports'}/stolen.html, innocent.html (+ .json twins)")
    print(f"  took {time.monotonic() - started:.0f} s")
    ok = verdicts.get("stolen") == 0 and verdicts.get("innocent") == 1 and refused.returncode == 5 and not ran
    if not ok:
        print("  the story did not come out as expected: see the reports above", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

"""The main job on its built-in default (see README): one network, five files, one graph.

Builds a small network (convolution with batch-norm, a residual add, linear,
LSTM), saves it as a PyTorch state dict, TorchScript, ONNX (with and without
the exporter's constant folding) and safetensors under demo-out/, then loads
each file with auditor's safe loaders and prints how the graphs line up.
"""

from __future__ import annotations

import contextlib
import io
import sys
import warnings
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from auditor.errors import AuditorError
from auditor.hashing import sha256_file
from auditor.loading import load_model

OUT = Path("demo-out")


class DemoNet(nn.Module):
    """Conv + batch-norm, a residual add, an LSTM over image rows, a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.lstm = nn.LSTM(8 * 8, 16, batch_first=True)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn1(self.conv1(x)))
        h = torch.relu(h + self.bn2(self.conv2(h)))
        rows = h.permute(0, 2, 1, 3).flatten(2)  # (batch, 8 rows, 8 channels * 8 columns)
        out, _ = self.lstm(rows)
        return self.fc(out[:, -1])


def save_all(model: nn.Module) -> dict[str, Path]:
    OUT.mkdir(exist_ok=True)
    example = torch.randn(1, 1, 8, 8)
    paths = {
        "PyTorch state dict": OUT / "demo.pt",
        "TorchScript": OUT / "demo.torchscript.pt",
        "ONNX (folded)": OUT / "demo.onnx",
        "ONNX (unfolded)": OUT / "demo-unfolded.onnx",
        "safetensors": OUT / "demo.safetensors",
    }
    torch.save(model.state_dict(), paths["PyTorch state dict"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.trace(model, example).save(str(paths["TorchScript"]))
    # The exporters' tracer warnings and progress chatter are not the demo's story.
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        for key, fold in (("ONNX (folded)", True), ("ONNX (unfolded)", False)):
            torch.onnx.export(model, (example,), str(paths[key]), dynamo=False, do_constant_folding=fold)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(paths["safetensors"]))
    return paths


class _Payload:
    """What a hostile checkpoint hides: unpickling it would run a shell command."""

    def __reduce__(self) -> tuple[object, tuple[str]]:
        import os

        return (os.system, (f"touch {OUT / 'PWNED'}",))


def hostile_checkpoint() -> None:
    """Save a checkpoint that would run a command under torch.load, and show auditor refuse it."""
    path = OUT / "hostile.pt"
    (OUT / "PWNED").unlink(missing_ok=True)
    torch.save({"fc.weight": torch.zeros(2, 2), "extra": _Payload()}, path)
    try:
        load_model(path)
        print("hostile.pt          loaded?! (this is a bug)")
    except AuditorError as exc:
        print(f"hostile.pt           refused (exit code {exc.exit_code}): {exc}")
    ran = (OUT / "PWNED").exists()
    print(f"{'':20s} the hidden command {'RAN (bug!)' if ran else 'did not run'}\n")


def main() -> int:
    torch.manual_seed(0)
    model = DemoNet().eval()
    paths = save_all(model)
    print(f"saved one network in {len(paths)} forms under {OUT}/\n")
    for label, path in paths.items():
        try:
            graph = load_model(path)
        except AuditorError as exc:
            print(f"{label:20s} error: {exc}")
            continue
        layers = ", ".join(f"{layer.name}:{layer.kind}" for layer in graph.layers)
        print(f"{label:20s} {path.name}  sha256 {sha256_file(path)[:16]}...  format={graph.format}")
        print(f"{'':20s} {len(graph.layers)} layers, {graph.parameter_count:,d} parameters, "
              f"{len(graph.edges)} edges ({graph.edge_source})")
        print(f"{'':20s} {layers}\n")
    hostile_checkpoint()
    print("inspect any of them:  .venv/bin/auditor inspect demo-out/demo.onnx")
    return 0


if __name__ == "__main__":
    sys.exit(main())

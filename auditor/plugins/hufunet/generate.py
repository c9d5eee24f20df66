"""``auditor hufunet generate``: train the owner's HufuNet and write it, with its key, as a secret file.

The file (scheme ``hufunet-secret``, mode 0600) holds the whole HufuNet (EPH
and SPH), the 32-byte HMAC key of the placement and the public data set's
identity; whoever holds it can both place and find the EPH, so it never leaves
the owner. Weights are stored as base64 of float32 little-endian bytes.
"""

from __future__ import annotations

import base64
import binascii
import math
import secrets
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from auditor import hookimpl
from auditor.errors import InputError, UsageError

if TYPE_CHECKING:  # torch and the network load when a HufuNet is trained or read, not when the command registers
    import numpy as np
    import torch

    from auditor.plugins.hufunet.network import HufuNet

__all__ = [
    "DEFAULTS",
    "KEY_BYTES",
    "MIN_DIGITS_ACCURACY",
    "SCHEME",
    "generate_hufunet",
    "hmac_key",
    "hufunet_app",
    "hufunet_from_payload",
    "load_hufunet",
    "parse_widths",
    "register_commands",
]

SCHEME = "hufunet-secret"
KEY_BYTES = 32
MIN_DIGITS_ACCURACY = 0.95
#: Adam at 1e-2 with a cosine schedule, 30 epochs of batch 32, kernel dropout 0.1: ~97% on digits
#: in a few seconds, and ~90% with a tenth of its kernels zeroed (docs/hufunet.md).
DEFAULTS: dict[str, Any] = {"epochs": 30, "lr": 1e-2, "batch_size": 32, "seed": 0, "kernel_dropout": 0.1}

hufunet_app = typer.Typer(help="HufuNet (Lv et al., 2023): the owner's secret network.", no_args_is_help=True)


def _le_bytes(t: torch.Tensor) -> bytes:
    import torch

    return t.detach().to("cpu", torch.float32).contiguous().numpy().astype("<f4", copy=False).tobytes()


def _b64(*tensors: torch.Tensor) -> str:
    """Base64 of the float32 little-endian bytes of ``tensors``, concatenated in order."""
    return base64.b64encode(b"".join(_le_bytes(t) for t in tensors)).decode("ascii")


def _fit(net: HufuNet, data: Any, *, epochs: int, lr: float, batch_size: int, seed: int, progress: bool) -> float:
    """Adam with a cosine schedule on the train split (the shared loop); returns the seconds it took."""
    from auditor.toolkit.training import TrainConfig, train

    config = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, optimizer="adam", seed=seed, schedule="cosine")
    result = train(net, data, config, progress=progress)
    net.eval()
    return result.seconds


def generate_hufunet(
    *,
    out: Path,
    dataset: str = "digits",
    fashion_mnist: Path | None = None,
    widths: tuple[int, ...] | None = None,
    epochs: int = DEFAULTS["epochs"],
    lr: float = DEFAULTS["lr"],
    batch_size: int = DEFAULTS["batch_size"],
    seed: int = DEFAULTS["seed"],
    kernel_dropout: float = DEFAULTS["kernel_dropout"],
    progress: bool = False,
    overwrite: bool = False,
    hmac_key: bytes | None = None,
) -> dict[str, Any]:
    """Train a HufuNet on the public data set and write the owner's secret HufuNet file ``out``.

    ``dataset`` is ``digits`` (the bundled digits, split seed 0) or
    ``fashion-mnist`` (then ``fashion_mnist`` names the folder of its IDX files;
    giving that folder alone implies it). On digits the network must reach
    :data:`MIN_DIGITS_ACCURACY` or nothing is written. Returns a JSON-ready
    summary (path, SHA-256, accuracy, sizes); never the key.

    The HMAC key is fresh random bytes from :mod:`secrets` unless ``hmac_key``
    is given: that is for tests, reproductions and attack simulations, which
    must give the same positions on every run; an owner never passes one.
    """
    import torch

    from auditor.bundle import save_bundle
    from auditor.plugins.hufunet import idx
    from auditor.plugins.hufunet.network import (
        DIGITS_WIDTHS,
        HufuNet,
        accuracy,
        check_shape,
        eph_count,
        eph_of,
        sph_of,
    )
    from auditor.toolkit import data as datasets

    out = Path(out)
    if hmac_key is not None and len(hmac_key) != KEY_BYTES:
        raise UsageError(f"the HMAC key must be {KEY_BYTES} bytes, not {len(hmac_key)}")
    key = secrets.token_bytes(KEY_BYTES) if hmac_key is None else hmac_key
    if fashion_mnist is not None and dataset == "digits":
        dataset = "fashion-mnist"
    if dataset not in ("digits", "fashion-mnist"):
        raise UsageError(f"unknown HufuNet data set {dataset!r}; digits or fashion-mnist")
    if dataset == "fashion-mnist" and fashion_mnist is None:
        raise UsageError("fashion-mnist needs the folder of its IDX files (--fashion-mnist DIR)")
    if epochs < 1 or batch_size < 1 or not lr > 0:
        raise UsageError("epochs and batch size must be >= 1 and the learning rate > 0")
    if out.exists() and not overwrite:
        raise UsageError(f"{out} already exists; choose another --out or --overwrite")
    if out.is_dir():
        raise UsageError(f"{out} is a folder; --out names the secret HufuNet file")

    data = idx.fashion_mnist(fashion_mnist) if dataset == "fashion-mnist" and fashion_mnist else datasets.digits()
    in_channels = data.input_shape[0]
    chosen = check_shape(widths if widths is not None else DIGITS_WIDTHS, in_channels, data.num_classes)
    torch.manual_seed(seed)
    net = HufuNet(chosen, in_channels=in_channels, num_classes=data.num_classes, kernel_dropout=kernel_dropout)
    seconds = _fit(net, data.train, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed, progress=progress)
    acc = accuracy(net, data)
    if dataset == "digits" and acc < MIN_DIGITS_ACCURACY:
        raise UsageError(
            f"the HufuNet reached {acc:.2%} on the digits test split, below the required "
            f"{MIN_DIGITS_ACCURACY:.0%}; try more --epochs, wider --width or another --seed"
        )
    eph = eph_of(net)
    sph = sph_of(net)
    payload: dict[str, Any] = {
        "widths": list(chosen),
        "in_channels": in_channels,
        "num_classes": data.num_classes,
        "eph": {
            "dtype": "float32-le",
            "shapes": [list(w.shape) for w in eph],
            "data": _b64(*eph),
        },
        "sph": {
            "dtype": "float32-le",
            "weight_shape": list(sph["weight"].shape),
            "bias_shape": list(sph["bias"].shape),
            "weight": _b64(sph["weight"]),
            "bias": _b64(sph["bias"]),
        },
        "hmac_key": base64.b64encode(key).decode("ascii"),
        "dataset": {
            "name": data.name,
            "split": "standard" if data.split_seed is None else "seeded",
            "split_seed": data.split_seed,
            "test_sha256": data.test_sha256,
            "test_size": len(data.test),
            "input_shape": list(data.input_shape),
        },
        "acc_original": acc,
        "training": {
            "optimizer": "adam",
            "schedule": "cosine",
            "epochs": epochs,
            "lr": lr,
            "batch_size": batch_size,
            "seed": seed,
            "kernel_dropout": kernel_dropout,
            "seconds": round(seconds, 3),
        },
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    sha = save_bundle(out, scheme=SCHEME, payload=payload, secret=True)
    return {
        "path": str(out),
        "sha256": sha,
        "secret": True,
        "accuracy": acc,
        "dataset": data.name,
        "test_size": len(data.test),
        "widths": list(chosen),
        "eph_kernels": eph_count(chosen, in_channels),
        "seconds": seconds,
    }


def _decode(path: Path | None, text: Any, what: str, count: int) -> np.ndarray:
    import numpy as np

    if not isinstance(text, str):
        raise InputError(path, f"{what} must be a base64 string")
    try:
        raw = base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        raise InputError(path, f"{what} is not valid base64") from None
    if len(raw) != 4 * count:
        raise InputError(path, f"{what} holds {len(raw):,d} bytes, the shapes need {4 * count:,d}")
    arr = np.frombuffer(raw, dtype="<f4").astype(np.float32)
    if not np.isfinite(arr).all():
        raise InputError(path, f"{what} holds a NaN or an infinity")
    return arr


def _int_list(path: Path | None, value: Any, what: str) -> list[int]:
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise InputError(path, f"{what} must be a list of integers")
    return list(value)


def load_hufunet(path: Path) -> tuple[HufuNet, dict[str, Any]]:
    """The owner's HufuNet and the payload of the secret file ``path``.

    Checks the scheme, the widths, every shape and byte count and the key's
    length; anything off is an :class:`~auditor.errors.InputError` naming the
    file (and never showing the key). ``payload["hmac_key"]`` is base64: see :func:`hmac_key`.
    """
    from auditor.bundle import load_bundle

    path = Path(path)
    bundle = load_bundle(path)
    if bundle.scheme != SCHEME:
        raise InputError(path, f"not a secret HufuNet file: its scheme is {bundle.scheme!r}, not {SCHEME!r}")
    return hufunet_from_payload(bundle.payload, path), bundle.payload


def hufunet_from_payload(p: Any, path: Path | None = None) -> HufuNet:
    """The HufuNet a secret payload describes (the secret file's payload, or the
    ``hufunet`` section of an owner bundle), every field checked as
    :func:`load_hufunet` says; errors name ``path``."""
    import torch

    from auditor.plugins.hufunet.network import HufuNet, check_shape

    if not isinstance(p, dict):
        raise InputError(path, "the HufuNet section must be an object")
    for name in ("widths", "in_channels", "num_classes", "eph", "sph", "hmac_key", "dataset", "acc_original"):
        if name not in p:
            raise InputError(path, f'the secret HufuNet file lacks the field "{name}"')
    widths = _int_list(path, p["widths"], '"widths"')
    in_channels, num_classes = p["in_channels"], p["num_classes"]
    try:
        checked = check_shape(widths, in_channels, num_classes)
    except UsageError as exc:
        raise InputError(path, str(exc)) from None
    eph, sph = p["eph"], p["sph"]
    if not isinstance(eph, dict) or not isinstance(sph, dict):
        raise InputError(path, '"eph" and "sph" must be objects')
    chans = (in_channels, *checked)
    expected = [[chans[i + 1], chans[i], 3, 3] for i in range(len(checked))]
    shapes = eph.get("shapes")
    if shapes != expected:
        raise InputError(path, f"the EPH shapes {shapes!r} do not fit widths {widths} (expected {expected})")
    # Decoded (and so bounded by the bundle's size cap) before the network is allocated:
    # widths near the limit would otherwise ask for gigabytes.
    flat = _decode(path, eph.get("data"), "the EPH data", sum(math.prod(s) for s in expected))
    w_shape, b_shape = [num_classes, checked[-1]], [num_classes]
    if sph.get("weight_shape") != w_shape or sph.get("bias_shape") != b_shape:
        raise InputError(path, f"the SPH shapes do not fit the network (expected {w_shape} and {b_shape})")
    weight = _decode(path, sph.get("weight"), "the SPH weight", math.prod(w_shape))
    bias = _decode(path, sph.get("bias"), "the SPH bias", math.prod(b_shape))
    hmac_key(p, path)
    acc = p["acc_original"]
    if isinstance(acc, bool) or not isinstance(acc, int | float) or not 0.0 <= acc <= 1.0:
        raise InputError(path, '"acc_original" must be a number between 0 and 1')
    ds = p["dataset"]
    if not isinstance(ds, dict) or not isinstance(ds.get("name"), str) or not isinstance(ds.get("test_sha256"), str):
        raise InputError(path, '"dataset" must be an object with a "name" and a "test_sha256"')
    net = HufuNet(checked, in_channels=in_channels, num_classes=num_classes)
    with torch.no_grad():
        start = 0
        for conv in net.conv_layers():
            w = conv.weight
            w.copy_(torch.from_numpy(flat[start : start + w.numel()].reshape(w.shape)))
            start += w.numel()
        net.fc.weight.copy_(torch.from_numpy(weight.reshape(w_shape)))
        net.fc.bias.copy_(torch.from_numpy(bias.reshape(b_shape)))
    net.eval()
    return net


def hmac_key(payload: dict[str, Any], path: Path | None = None) -> bytes:
    """The 32-byte placement key of a secret HufuNet payload (InputError if it is not one)."""
    try:
        key = base64.b64decode(str(payload.get("hmac_key", "")).encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        raise InputError(path, '"hmac_key" is not valid base64') from None
    if len(key) != KEY_BYTES:
        raise InputError(path, f'"hmac_key" must be {KEY_BYTES} bytes, not {len(key)}')
    return key


def parse_widths(text: str) -> tuple[int, ...]:
    """``"4,8,16,16,8"`` as a tuple of ints (UsageError if it is not five positive integers)."""
    from auditor.plugins.hufunet.network import check_shape

    try:
        widths = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise UsageError(f"--width must be five comma-separated integers, not {text!r}") from None
    return check_shape(widths, 1, 10)


@hufunet_app.callback()
def _group() -> None:
    """HufuNet (Lv et al., 2023): the owner's secret network."""


@hufunet_app.command("generate")
def generate(  # noqa: PLR0917 (typer passes options positionally)
    out: Annotated[Path, typer.Option("--out", help="The secret HufuNet file to write (mode 0600).")],
    dataset: Annotated[str, typer.Option("--dataset", help="digits (bundled) or fashion-mnist.")] = "digits",
    fashion_mnist: Annotated[
        Path | None, typer.Option("--fashion-mnist", help="Folder of the Fashion-MNIST IDX files.")
    ] = None,
    width: Annotated[
        str | None, typer.Option("--width", help="Five conv widths, e.g. 4,8,16,16,8 (the paper: 32,64,128,128,64).")
    ] = None,
    epochs: Annotated[int, typer.Option("--epochs", min=1, help="Training epochs.")] = DEFAULTS["epochs"],
    lr: Annotated[float, typer.Option("--lr", help="Learning rate (Adam, cosine schedule).")] = DEFAULTS["lr"],
    seed: Annotated[int, typer.Option("--seed", help="Seed of initialisation and shuffling.")] = DEFAULTS["seed"],
    kernel_dropout: Annotated[
        float, typer.Option("--kernel-dropout", help="Chance of zeroing a kernel per training step (0 disables).")
    ] = DEFAULTS["kernel_dropout"],
    no_progress: Annotated[bool, typer.Option("--no-progress", help="Do not draw the progress bar.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing --out file.")] = False,
) -> None:
    """Train your HufuNet on a public data set and write it with a fresh placement key, as a secret file."""
    from auditor.cli.console import out as console
    from auditor.cli.console import shown

    summary = generate_hufunet(
        out=out,
        dataset=dataset,
        fashion_mnist=fashion_mnist,
        widths=parse_widths(width) if width else None,
        epochs=epochs,
        lr=lr,
        seed=seed,
        kernel_dropout=kernel_dropout,
        progress=not no_progress,
        overwrite=overwrite,
    )
    console.print(
        f"test accuracy: {summary['accuracy']:.2%} ({summary['test_size']} test examples, "
        f"{shown(summary['dataset'])}); {summary['eph_kernels']} EPH kernels"
    )
    console.print(f"wrote {shown(summary['path'])}  sha256 {summary['sha256']}")
    console.print("this file is SECRET (mode 0600): it holds the whole HufuNet and the placement key; keep it private")


@hookimpl
def register_commands(app: typer.Typer) -> None:
    """Add the ``auditor hufunet`` group with its ``generate`` command."""
    if any(g.typer_instance is hufunet_app for g in app.registered_groups):
        return  # already added (the CLI was started twice in one process)
    app.add_typer(hufunet_app, name="hufunet")

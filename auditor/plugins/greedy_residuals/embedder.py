"""Greedy Residuals embedder: ``auditor embed greedy-residuals`` and its plugin registration.

Trains a built-in architecture on the bundled digits (or the owner's model
and data, named as ``module:function``) with the embedding term added to the
loss, checks that the detector would find what was embedded (every marked
layer carries the signature bits the detector needs, or ``min_bits``), then
writes ``model.safetensors``, ``model.pt`` and ``owner_bundle.json``; a failed
check writes nothing and exits 1. The private key signs the message and is
dropped; it never reaches an output.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer  # the CLI's own dependency; the command's annotations are resolved in this module

from auditor import hookimpl
from auditor.bases import Embedder
from auditor.errors import InputError, UsageError
from auditor.toolkit import options as opt

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ["BUNDLE_FILE", "DEFAULTS", "GreedyResidualsEmbedder", "embed_greedy_residuals"]

BUNDLE_FILE = "owner_bundle.json"
MODEL_STEM = "model"
#: Training defaults: Adam at 1e-2 for 20 epochs of batch 64 takes the built-in CNN to
#: ~99% on digits with every signature bit embedded and the hinge close to its margin
#: (the paper's lambda = 0.01 needs the larger step to get there in ~460 steps).
DEFAULTS: dict[str, Any] = {
    "arch": "cnn",
    "epochs": 20,
    "lr": 1e-2,
    "batch_size": 64,
    "optimizer": "adam",
    "seed": 0,
    "device": "auto",
    "precision": "fp32",
}


def read_passphrase(path: Path) -> bytes:
    """A passphrase file's bytes without the trailing newline an editor adds."""
    from auditor.safeio import read_small_file  # a regular file of at most 64 KiB: never a pipe or a device

    data = read_small_file(Path(path), limit=64 << 10, what="a passphrase file")
    data = data.removesuffix(b"\n").removesuffix(b"\r")
    if not data:
        raise InputError(path, "the passphrase file is empty")
    return data


def embed_greedy_residuals(
    *,
    key: Path,
    message: str,
    out_dir: Path,
    passphrase: bytes | None = None,
    arch: str = DEFAULTS["arch"],
    model_factory: str | None = None,
    data_factory: str | None = None,
    layers: list[str] | None = None,
    epochs: int = DEFAULTS["epochs"],
    lr: float = DEFAULTS["lr"],
    batch_size: int = DEFAULTS["batch_size"],
    optimizer: str = DEFAULTS["optimizer"],
    seed: int = DEFAULTS["seed"],
    device: str = DEFAULTS["device"],
    precision: str = DEFAULTS["precision"],
    min_bits: int | None = None,
    progress: bool = False,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Train a watermarked model and write it and its owner bundle under ``out_dir``.

    ``min_bits`` is the fewest signature bits every marked layer must carry (default: what the
    detector needs at its threshold); below it :class:`~auditor.toolkit.training.EmbeddingCheckError`
    is raised and nothing is written. Returns a JSON-ready summary: files written (with SHA-256),
    test accuracy, per-layer detection rate, the check, the marked layers and the training settings.
    """
    import torch

    from auditor import keys
    from auditor.plugins.greedy_residuals.owner import GreedyResidualsWatermark
    from auditor.safeio import sha256_file
    from auditor.toolkit import data as datasets
    from auditor.toolkit import models as zoo
    from auditor.toolkit import training

    out_dir = Path(out_dir)
    targets = [*training.model_files(out_dir, MODEL_STEM).values(), out_dir / BUNDLE_FILE]
    training.refuse_existing(targets, overwrite=overwrite, hint="choose another --out folder or --overwrite")
    # Checked before the key is read and before any training: fail fast and cheaply.
    config = training.TrainConfig(
        epochs=epochs, batch_size=batch_size, lr=lr, optimizer=optimizer, seed=seed, device=device,
        precision=precision,
    )  # fmt: skip
    torch_device = training.resolve_device(device)
    training.autocast_dtype(precision, torch_device)  # a precision the device lacks fails before training
    if min_bits is not None and min_bits < 0:
        raise UsageError(f"--min-bits must be 0 or more, not {min_bits}")
    private_key = keys.load_private_key(Path(key), passphrase)

    dataset = datasets.owner_dataset(data_factory)
    torch.manual_seed(seed)
    model, architecture = zoo.owner_model(
        arch, model_factory=model_factory, num_classes=dataset.num_classes, input_shape=dataset.input_shape
    )

    watermark = GreedyResidualsWatermark.create(model, private_key=private_key, message=message, layers=layers)
    del private_key
    result = training.train(model, dataset.train, config, penalty=watermark.penalty, progress=progress)
    accuracy = training.evaluate(model, dataset.test, torch_device)
    model.to("cpu")
    rates = watermark.rates(model)
    check = watermark.check(model, min_bits=min_bits).require()  # before any file: never release a mark unfound

    paths = training.save_model(model, out_dir, MODEL_STEM, overwrite=overwrite)
    recipe = {
        "dataset": dataset.describe(),
        "test_accuracy": accuracy,
        "epochs": epochs,
        "batch_size": batch_size,
        "lr": lr,
        "optimizer": optimizer,
        "seed": seed,
        "precision": precision,
    }
    bundle_path = out_dir / BUNDLE_FILE
    bundle_sha = watermark.save_bundle(
        bundle_path, model, model_file=paths["safetensors"], architecture=architecture, training=recipe
    )
    return {
        "files": {
            "safetensors": {"path": str(paths["safetensors"]), "sha256": sha256_file(paths["safetensors"])},
            "pt": {"path": str(paths["pt"]), "sha256": sha256_file(paths["pt"])},
            "bundle": {"path": str(bundle_path), "sha256": bundle_sha},
        },
        "test_accuracy": accuracy,
        "rates": rates,
        "bits": watermark.params.bits,
        "check": check.to_dict(),
        "architecture": architecture,
        "dataset": dataset.name,
        "test_size": len(dataset.test),
        "seconds": result.seconds,
        "device": str(torch_device),
        "precision": precision,
        "skipped_steps": result.skipped_steps,
    }


class GreedyResidualsEmbedder(Embedder):
    """Trains a model with the Greedy Residuals embedding term and writes the owner bundle."""

    id = "greedy-residuals"
    description = "Greedy Residuals (ICML 2021): signature bits in the signs of top-|w| weight residuals"

    def embed(self, *, out_dir: Path, options: Mapping[str, Any]) -> dict[str, Any]:
        """``options`` are the keyword arguments of :func:`embed_greedy_residuals`
        (``key`` and ``message`` required)."""
        opt.refuse_unknown_options("greedy-residuals", embed_greedy_residuals, options)
        missing = [name for name in ("key", "message") if name not in options]
        if missing:
            raise UsageError(f"greedy-residuals needs the option(s): {', '.join(missing)}")
        return embed_greedy_residuals(out_dir=Path(out_dir), **dict(options))


@hookimpl
def register_embedders(register: Callable[[Embedder], None]) -> None:
    """Register the Greedy Residuals embedder."""
    register(GreedyResidualsEmbedder())


@hookimpl
def register_commands(app: typer.Typer) -> None:
    """Add ``auditor embed greedy-residuals``."""
    from auditor.cli.console import emit_json, out, shown, subcommands

    embed_app = subcommands(app, "embed", "Train an owner's model with a watermark.")

    if any(c.name == "greedy-residuals" for c in embed_app.registered_commands):
        return  # already added (the CLI was started twice in one process)

    @embed_app.command("greedy-residuals")
    def greedy_residuals(  # noqa: PLR0917 (typer passes options positionally)
        key: Annotated[Path, typer.Option("--key", help="The owner's private key (PEM), from `auditor keys`.")],
        message: Annotated[str, typer.Option("--message", help="The copyright statement to sign.")],
        out_dir: opt.OutDir,
        passphrase_file: Annotated[
            Path | None, typer.Option("--passphrase-file", help="File holding the private key's passphrase.")
        ] = None,
        arch: opt.Arch = DEFAULTS["arch"],
        model_factory: opt.ModelFactory = None,
        data_factory: opt.DataFactory = None,
        layers: Annotated[
            str | None, typer.Option("--layers", help="Parameters to mark, comma-separated (default: the rule).")
        ] = None,
        epochs: opt.Epochs = DEFAULTS["epochs"],
        lr: opt.LearningRate = DEFAULTS["lr"],
        batch_size: opt.BatchSize = DEFAULTS["batch_size"],
        seed: opt.Seed = 0,
        device: opt.Device = DEFAULTS["device"],
        precision: opt.Precision = DEFAULTS["precision"],
        min_bits: Annotated[
            int | None,
            typer.Option(
                "--min-bits",
                help="Fewest signature bits every marked layer must carry (default: what detection needs).",
            ),
        ] = None,
        no_progress: opt.NoProgress = False,
        overwrite: opt.Overwrite = False,
        as_json: opt.Json = False,
    ) -> None:
        """Train a model with a Greedy Residuals watermark signed by your key; write the model and the owner bundle."""
        passphrase = read_passphrase(passphrase_file) if passphrase_file is not None else None
        summary = embed_greedy_residuals(
            key=key,
            message=message,
            out_dir=out_dir,
            passphrase=passphrase,
            arch=arch,
            model_factory=model_factory,
            data_factory=data_factory,
            layers=opt.split_names(layers),
            epochs=epochs,
            lr=lr,
            batch_size=batch_size,
            seed=seed,
            device=device,
            precision=precision,
            min_bits=min_bits,
            progress=not no_progress,
            overwrite=overwrite,
        )
        if as_json:
            emit_json(summary)
            return
        for f in summary["files"].values():
            out.print(f"wrote {shown(f['path'])}  sha256 {f['sha256']}")
        out.print(
            f"test accuracy: {summary['test_accuracy']:.2%} "
            f"({summary['test_size']} test examples, {shown(summary['dataset'])})"
        )
        bits, needed = summary["bits"], summary["check"]["bits_needed"]
        for name, rate in summary["rates"].items():
            out.print(
                f"detection rate {shown(name)}: {rate:.2%} ({round(rate * bits)}/{bits} bits; detection needs {needed})"
            )

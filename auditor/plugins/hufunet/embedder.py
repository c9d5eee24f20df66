"""HufuNet embedder: ``auditor embed hufunet`` and its plugin registration.

Trains a host (a built-in architecture or the owner's own, the same choices
as the Greedy Residuals embedder) on the bundled digits or the owner's data
with HufuNet's EPH placed at the keyed positions and frozen, checks what the
detector will measure (EPH bit-identical, Acc_combined above its bar), then
writes ``model.safetensors``, ``model.pt`` and the SECRET owner bundle
``owner_bundle.json`` (mode 0600) that verification needs. A failed check
writes nothing and exits 1.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Annotated, Any

import typer

from auditor import hookimpl
from auditor.bases import Embedder
from auditor.errors import UsageError
from auditor.toolkit import options as opt

__all__ = ["DEFAULTS", "HufuNetEmbedder", "embed_hufunet"]

#: Adam at 1e-2 for 20 epochs as for Greedy Residuals; width 2 makes the built-in CNN a host of
#: 10,272 kernels, so the default HufuNet's 548 EPH kernels are 5.3% of it (the paper: 1.5%-13%).
DEFAULTS: dict[str, Any] = {
    "arch": "cnn",
    "width": 2,
    "epochs": 20,
    "lr": 1e-2,
    "batch_size": 64,
    "optimizer": "adam",
    "seed": 0,
    "device": "auto",
    "precision": "fp32",
}


def embed_hufunet(
    *,
    hufunet: Path,
    out_dir: Path,
    arch: str = DEFAULTS["arch"],
    width: int = DEFAULTS["width"],
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
    min_acc_combined: float | None = None,
    progress: bool = False,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Train a host with the secret HufuNet's EPH frozen in it; write the model and the owner bundle.

    Before anything is written, :meth:`~auditor.plugins.hufunet.owner.EmbeddedHufuNet.check` must pass
    (EPH bit-identical; Acc_combined above the detector's bar, or ``min_acc_combined``), else
    :class:`~auditor.toolkit.training.EmbeddingCheckError`. Returns a JSON-ready summary (files with
    SHA-256, test accuracy, host size, EPH share, the check, Acc_combined read back from the trained
    weights); never the key.
    """
    import torch

    from auditor.plugins.hufunet.generate import hmac_key, load_hufunet
    from auditor.plugins.hufunet.owner import BUNDLE_FILE, MODEL_STEM, plant, write_bundle
    from auditor.toolkit import data as datasets
    from auditor.toolkit import models as zoo
    from auditor.toolkit import training

    out_dir = Path(out_dir)
    targets = [*training.model_files(out_dir, MODEL_STEM).values(), out_dir / BUNDLE_FILE]
    training.refuse_existing(targets, overwrite=overwrite, hint="choose another --out folder or --overwrite")
    config = training.TrainConfig(
        epochs=epochs, batch_size=batch_size, lr=lr, optimizer=optimizer, seed=seed, device=device,
        precision=precision,
    )  # fmt: skip
    torch_device = training.resolve_device(device)
    training.autocast_dtype(precision, torch_device)  # a precision the device lacks fails before training
    if min_acc_combined is not None and not 0.0 <= min_acc_combined <= 1.0:
        raise UsageError(f"--min-acc-combined must be between 0 and 1, not {min_acc_combined}")
    net, secret = load_hufunet(Path(hufunet))
    key = hmac_key(secret, Path(hufunet))

    dataset = datasets.owner_dataset(data_factory)
    torch.manual_seed(seed)
    model, architecture = zoo.owner_model(
        arch, model_factory=model_factory, num_classes=dataset.num_classes, input_shape=dataset.input_shape,
        width=1 if model_factory else width,
    )  # fmt: skip
    embedded = plant(model, net, key, layers=layers)
    del key
    try:
        result = training.train(model, dataset.train, config, after_step=embedded.frozen.after_step, progress=progress)
    finally:
        embedded.frozen.detach()
    model.to("cpu")
    # Before any file is written: EPH bit-identical and Acc_combined as the detector will measure them.
    check = embedded.check(model, net, secret, min_acc_combined=min_acc_combined).require()
    test_accuracy = training.evaluate(model, dataset.test, "cpu")
    paths = training.save_model(model, out_dir, MODEL_STEM, overwrite=overwrite)
    recipe = {
        "dataset": dataset.describe(), "test_accuracy": test_accuracy, "epochs": epochs, "batch_size": batch_size,
        "lr": lr, "optimizer": optimizer, "seed": seed, "precision": precision,
    }  # fmt: skip
    bundle_path = out_dir / BUNDLE_FILE
    bundle_sha, payload = write_bundle(
        bundle_path, model, embedded, net, secret, files=paths, architecture=architecture,
        width=None if model_factory else width, training=recipe,
    )  # fmt: skip
    model_sha = payload["model"]["sha256"]
    acc_combined = payload["release"]["acc_combined"]
    return {
        "files": {
            "safetensors": {"path": str(paths["safetensors"]), "sha256": model_sha},
            "pt": {"path": str(paths["pt"]), "sha256": payload["model"]["pt_sha256"]},
            "bundle": {"path": str(bundle_path), "sha256": bundle_sha, "secret": True},
        },
        "test_accuracy": test_accuracy,
        "architecture": architecture,
        "dataset": dataset.name,
        "test_size": len(dataset.test),
        "host_kernels": embedded.n,
        "eph_kernels": len(embedded.positions),
        "eph_fraction": embedded.eph_fraction,
        "acc_original": float(secret["acc_original"]),
        "acc_combined": acc_combined,
        "check": check.to_dict(),
        "seconds": result.seconds,
        "device": str(torch_device),
        "precision": precision,
        "skipped_steps": result.skipped_steps,
    }


class HufuNetEmbedder(Embedder):
    """Trains a host with HufuNet's EPH frozen at keyed positions and writes the secret owner bundle."""

    id = "hufunet"
    description = "HufuNet (Lv et al., 2023): a secret network's kernels hidden at keyed positions of the host"

    def embed(self, *, out_dir: Path, options: Mapping[str, Any]) -> dict[str, Any]:
        """``options`` are the keyword arguments of :func:`embed_hufunet` (``hufunet`` required)."""
        opt.refuse_unknown_options("hufunet", embed_hufunet, options)
        if "hufunet" not in options:
            raise UsageError("hufunet needs the option: hufunet (the secret HufuNet file)")
        return embed_hufunet(out_dir=Path(out_dir), **dict(options))


@hookimpl
def register_embedders(register: Callable[[Embedder], None]) -> None:
    """Register the HufuNet embedder."""
    register(HufuNetEmbedder())


@hookimpl
def register_commands(app: typer.Typer) -> None:
    """Add ``auditor embed hufunet``."""
    from auditor.cli.console import emit_json, out, shown, subcommands

    embed_app = subcommands(app, "embed", "Train an owner's model with a watermark.")

    if any(c.name == "hufunet" for c in embed_app.registered_commands):
        return  # already added (the CLI was started twice in one process)

    @embed_app.command("hufunet")
    def hufunet(  # noqa: PLR0917 (typer passes options positionally)
        hufunet_file: Annotated[
            Path, typer.Option("--hufunet", help="The secret HufuNet file, from `auditor hufunet generate`.")
        ],
        out_dir: opt.OutDir,
        arch: opt.Arch = DEFAULTS["arch"],
        width: Annotated[
            int, typer.Option("--width", min=1, help="Channel multiplier of the built-in host (room for EPH).")
        ] = DEFAULTS["width"],
        model_factory: opt.ModelFactory = None,
        data_factory: opt.DataFactory = None,
        layers: Annotated[
            str | None, typer.Option("--layers", help="Host layers, comma-separated (default: every 3x3 conv).")
        ] = None,
        epochs: opt.Epochs = DEFAULTS["epochs"],
        lr: opt.LearningRate = DEFAULTS["lr"],
        batch_size: opt.BatchSize = DEFAULTS["batch_size"],
        seed: opt.Seed = 0,
        device: opt.Device = DEFAULTS["device"],
        precision: opt.Precision = DEFAULTS["precision"],
        min_acc_combined: Annotated[
            float | None,
            typer.Option(
                "--min-acc-combined",
                help="Lowest Acc_combined to accept (default: the detector's bar, DiffAcc < 0.15).",
            ),
        ] = None,
        no_progress: opt.NoProgress = False,
        overwrite: opt.Overwrite = False,
        as_json: opt.Json = False,
    ) -> None:
        """Train a host with your HufuNet's EPH frozen at keyed positions; write the model and the SECRET bundle."""
        summary = embed_hufunet(
            hufunet=hufunet_file,
            out_dir=out_dir,
            arch=arch,
            width=width,
            model_factory=model_factory,
            data_factory=data_factory,
            layers=opt.split_names(layers),
            epochs=epochs,
            lr=lr,
            batch_size=batch_size,
            seed=seed,
            device=device,
            precision=precision,
            min_acc_combined=min_acc_combined,
            progress=not no_progress,
            overwrite=overwrite,
        )
        if as_json:
            emit_json(summary)
            return
        for f in summary["files"].values():
            out.print(f"wrote {shown(f['path'])}  sha256 {f['sha256']}")
        out.print(
            f"host test accuracy: {summary['test_accuracy']:.2%} "
            f"({summary['test_size']} test examples, {shown(summary['dataset'])})"
        )
        out.print(
            f"EPH: {summary['eph_kernels']} kernels in a host of {summary['host_kernels']} "
            f"({summary['eph_fraction']:.1%}); Acc_combined {summary['acc_combined']:.2%} "
            f"(Acc_original {summary['acc_original']:.2%}; detection needs above "
            f"{summary['check']['acc_combined_needed']:.2%}); EPH bit-identical "
            f"{summary['check']['bit_identical_fraction']:.2%}"
        )
        out.print("the owner bundle is SECRET (mode 0600): it holds the HufuNet and the placement key")

"""``auditor calibrate``: measure each detector's false-positive rate on models known to be independent of the
owner's, and write the null distribution of its deciding statistic (docs/calibration.md).

The models are a folder the analyst supplies, or models of a built-in architecture that this command trains
from scratch, one seed each, by the owner's recipe without the watermark. Each is audited exactly as a
suspect (:mod:`auditor.audit.calibrate`); the calibration file records the detector, the statistic, every
value, the verdicts, the models' SHA-256 and how they were made, and ``auditor audit --calibration FILE``
shows the measured rate beside the exact tail bound. Torch and the training code load when used.
"""

from __future__ import annotations

import shlex
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated, Any

import typer

from auditor.cli.console import emit_json, err, out, shown
from auditor.errors import UsageError

__all__ = ["RECIPE", "calibrate_command", "make_calibration", "train_independent"]

#: The training recipe of independent models: the built-in embedders' defaults (Adam at 1e-2, 20 epochs of
#: batch 64 on the bundled digits), so that the only difference from the owner's model is the watermark.
RECIPE: dict[str, Any] = {"epochs": 20, "lr": 1e-2, "batch_size": 64, "optimizer": "adam"}
FIRST_SEED = 1000
STEM = "independent"


def _progress(total: int, what: str) -> Any:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(stderr=True, highlight=False)
    bar = Progress(TextColumn(what), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console,
                   transient=True, disable=not console.is_terminal)  # fmt: skip
    return bar, bar.add_task(what, total=total)


def train_independent(
    folder: Path,
    *,
    n: int,
    first_seed: int = FIRST_SEED,
    arch: str = "cnn",
    width: int = 1,
    model_factory: str | None = None,
    data_factory: str | None = None,
    epochs: int = RECIPE["epochs"],
    lr: float = RECIPE["lr"],
    batch_size: int = RECIPE["batch_size"],
    optimizer: str = RECIPE["optimizer"],
    device: str = "cpu",
    on_model: Callable[[Path], None] | None = None,
) -> tuple[list[Path], list[dict[str, Any]], dict[str, Any]]:
    """Train ``n`` models of ``arch`` (or the ``model_factory``'s) from scratch on the digits (or the
    ``data_factory``'s data), seeds ``first_seed``, ``first_seed + 1``...; write each as
    ``folder/independent-SEED.safetensors`` (never over an existing file). Returns the paths, each model's
    seed and test accuracy, and how they were made (for the calibration's ``made`` block)."""
    import torch
    from safetensors.torch import save_file

    from auditor.safeio import write_atomically
    from auditor.toolkit import data as datasets
    from auditor.toolkit import models as zoo
    from auditor.toolkit import training

    training.TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, optimizer=optimizer, device=device)  # checks
    dataset = datasets.owner_dataset(data_factory)
    folder.mkdir(parents=True, exist_ok=True)
    paths, info = [], []
    for seed in range(first_seed, first_seed + n):
        torch.manual_seed(seed)
        model, _ = zoo.owner_model(
            arch, model_factory=model_factory, num_classes=dataset.num_classes, input_shape=dataset.input_shape,
            width=width,
        )  # fmt: skip
        config = training.TrainConfig(
            epochs=epochs, batch_size=batch_size, lr=lr, optimizer=optimizer, seed=seed, device=device
        )
        training.train(model, dataset.train, config)
        model.to("cpu")
        accuracy = training.evaluate(model, dataset.test)
        state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
        path = folder / f"{STEM}-{seed:05d}.safetensors"

        def write(target: Path, weights: dict[str, Any] = state) -> None:
            save_file(weights, str(target), metadata={"format": "pt"})

        try:
            write_atomically(path, write, exclusive=True)
        except FileExistsError:
            raise UsageError(f"{path}: already exists; calibrate into a new or empty --models folder") from None
        paths.append(path)
        info.append({"seed": seed, "test_accuracy": accuracy})
        if on_model is not None:
            on_model(path)
    what = model_factory or (arch if width == 1 else f"{arch} (width {width})")
    made = {
        "how": "trained",
        "description": (
            f"{n} {what} models trained from scratch on {dataset.name}, seeds {first_seed} to {first_seed + n - 1},"
            f" {epochs} epochs of {optimizer} at learning rate {lr:g}, batch {batch_size}: the owner's recipe"
            " without the watermark"
        ),
        "architecture": arch if not model_factory else None, "width": width if not model_factory else None,
        "model_factory": model_factory, "data": dataset.describe(), "data_factory": data_factory,
        "recipe": {"epochs": epochs, "lr": lr, "batch_size": batch_size, "optimizer": optimizer, "device": device},
        "seeds": [first_seed, first_seed + n - 1], "torch": torch.__version__, "threads": torch.get_num_threads(),
    }  # fmt: skip
    return paths, info, made


def _supplied(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise UsageError(f"{folder}: --models must name a folder of independent models (or add --train N)")
    entries = sorted((c for c in folder.iterdir() if not c.name.startswith(".")), key=lambda c: c.name)
    if not entries:
        raise UsageError(f"{folder}: the folder holds no models")
    return entries


def _command(args: dict[str, Any]) -> str:
    words = ["auditor", "calibrate", "--bundle", str(args["bundle"]), "--models", str(args["models"])]
    words += ["--out", str(args["out"])]
    if args["reference"] is not None:
        words += ["--reference", str(args["reference"])]
    for item in args["options"]:
        words += ["--option", str(item)]
    if args["name"]:
        words += ["--name", args["name"]]
    if args["train"]:
        words += ["--train", str(args["train"]), "--first-seed", str(args["first_seed"])]
        if args["model_factory"]:
            words += ["--model-factory", args["model_factory"]]
        else:
            words += ["--arch", args["arch"], "--width", str(args["width"])]
        if args["data_factory"]:
            words += ["--data-factory", args["data_factory"]]
        words += ["--epochs", str(args["epochs"]), "--lr", repr(float(args["lr"])), "--batch-size",
                  str(args["batch_size"]), "--optimizer", args["optimizer"]]  # fmt: skip
    return shlex.join(words)


def make_calibration(
    *,
    bundle: Path,
    models: Path,
    out: Path,
    train: int = 0,
    reference: Path | None = None,
    options: Sequence[str] = (),
    name: str = "",
    first_seed: int = FIRST_SEED,
    arch: str = "cnn",
    width: int = 1,
    model_factory: str | None = None,
    data_factory: str | None = None,
    epochs: int = RECIPE["epochs"],
    lr: float = RECIPE["lr"],
    batch_size: int = RECIPE["batch_size"],
    optimizer: str = RECIPE["optimizer"],
    device: str = "cpu",
) -> tuple[dict[str, Any], str]:
    """Make a calibration and write it to ``out``: the models in the folder ``models``, or (``train`` > 0)
    that many trained into it first. Returns the document and the file's SHA-256."""
    from auditor.audit.calibrate import calibrate
    from auditor.audit.calibration import write_calibration
    from auditor.audit.inputs import load_inputs

    args = dict(locals())
    if train < 0:
        raise UsageError("--train must be 0 (read the --models folder) or the number of models to train")
    inputs = load_inputs(bundles=[bundle], reference=reference, options=options)
    taken = {p.resolve() for p in (bundle, reference) if p is not None and p.exists()}
    if out.resolve() in taken or out.resolve().parent == models.resolve() or out.is_dir():
        raise UsageError(f"{out}: the calibration must be a new file outside the --models folder, not an input")
    if train:
        if models.exists() and (not models.is_dir() or any(models.iterdir())):
            raise UsageError(f"{models}: with --train, --models names a new or empty folder for the trained models")
        bar, task = _progress(train, "training")
        with bar:
            paths, info, made = train_independent(
                models, n=train, first_seed=first_seed, arch=arch, width=width, model_factory=model_factory,
                data_factory=data_factory, epochs=epochs, lr=lr, batch_size=batch_size, optimizer=optimizer,
                device=device, on_model=lambda _: bar.advance(task),
            )  # fmt: skip
    else:
        paths, info = _supplied(models), None
        made = {"how": "supplied", "description": f"{len(paths)} models supplied in the folder {models.name}",
                "folder": str(models)}  # fmt: skip
    bar, task = _progress(len(paths), "auditing")
    with bar:
        document = calibrate(
            paths, inputs, made=made, command=_command(args), name=name, model_info=info,
            on_model=lambda _: bar.advance(task),
        )  # fmt: skip
    return document, write_calibration(document, out)


def calibrate_command(  # noqa: PLR0917 (typer passes options positionally)
    bundle: Annotated[Path, typer.Option("--bundle", help="The owner bundle the models are audited against.")],
    models: Annotated[
        Path,
        typer.Option(
            "--models",
            help="Folder of models known to be independent of the owner's; with --train, a new or empty folder"
            " the trained models are written to.",
        ),
    ],
    out_file: Annotated[Path, typer.Option("--out", help="Write the calibration (JSON) to this file.")],
    train: Annotated[
        int, typer.Option("--train", min=0, help="Train this many independent models into --models first.")
    ] = 0,
    reference: Annotated[
        Path | None,
        typer.Option("--reference", help="The owner's released model, as the audits will use it (restore stage)."),
    ] = None,
    option: Annotated[
        list[str] | None,
        typer.Option("--option", "-O", help="A detector option, DETECTOR.NAME=VALUE (repeatable), as for audit."),
    ] = None,
    name: Annotated[str, typer.Option("--name", help="A name for the calibration set, shown in reports.")] = "",
    first_seed: Annotated[int, typer.Option("--first-seed", help="Seed of the first trained model.")] = FIRST_SEED,
    arch: Annotated[str, typer.Option("--arch", help="Built-in architecture to train: cnn, resnet or lstm.")] = "cnn",
    width: Annotated[int, typer.Option("--width", min=1, help="Channel multiplier of the built-in.")] = 1,
    model_factory: Annotated[
        str | None, typer.Option("--model-factory", help="Train your model instead: module:function.")
    ] = None,
    data_factory: Annotated[
        str | None, typer.Option("--data-factory", help="Train on your data: module:function returning (train, test).")
    ] = None,
    epochs: Annotated[int, typer.Option("--epochs", min=0, help="Training epochs.")] = RECIPE["epochs"],
    lr: Annotated[float, typer.Option("--lr", help="Learning rate.")] = RECIPE["lr"],
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Batch size.")] = RECIPE["batch_size"],
    optimizer: Annotated[str, typer.Option("--optimizer", help="adam, adamw or sgd.")] = RECIPE["optimizer"],
    device: Annotated[str, typer.Option("--device", help="Where to train: cpu, auto, cuda or cuda:N.")] = "cpu",
    as_json: Annotated[bool, typer.Option("--json", help="Print the calibration as JSON.")] = False,
) -> None:
    """Measure each detector's false-positive rate on models known to be independent of the owner's.

    Every model in --models (or, with --train N, N models of a built-in architecture trained there from
    scratch, one seed each, by the owner's recipe without the watermark) is audited against --bundle exactly
    as a suspect; the calibration file written to --out holds each detector's deciding statistic on every
    model, its verdicts, the models' SHA-256 and how they were made. Give it to `auditor audit
    --calibration FILE`: the report shows the measured false-positive rate with its exact 95% upper bound
    beside the exact tail bound."""
    document, sha = make_calibration(
        bundle=bundle, models=models, out=out_file, train=train, reference=reference, options=option or [],
        name=name, first_seed=first_seed, arch=arch, width=width, model_factory=model_factory,
        data_factory=data_factory, epochs=epochs, lr=lr, batch_size=batch_size, optimizer=optimizer, device=device,
    )  # fmt: skip
    if as_json:
        from auditor.jsondata import jsonable

        emit_json(jsonable(document))
        return
    for d in document["detectors"]:
        fp = d["false_positive_rate"]
        values = [v for v in d["values"] if v is not None]
        spread = f"min {min(values):.3f}, max {max(values):.3f}" if values else "no values"
        rate = (
            f"{fp['false_positives']} of {fp['decided']} detected ({fp['rate']:.1%}; exact one-sided 95% upper bound"
            f" {fp['upper_bound']:.1%})" if fp["decided"] else "no verdicts"
        )  # fmt: skip
        out.print(shown(f"{d['detector']}: {d['statistic']} over {len(d['values'])} models: {spread}; {rate}"))
    if any(d["false_positive_rate"]["errors"] for d in document["detectors"]):
        err.print("warning: some models gave no verdict (see the calibration's verdicts)")
    out.print(shown(f"wrote {out_file}  sha256 {sha}"))

"""Embedding checks itself (issue 20, item 2) and mixed precision (item 4) for HufuNet: at the end
the embedder reads EPH back from the trained host as the detector will (bit-identical, Acc_combined
above the detector's bar) and writes nothing, exit 1, when it falls short."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from auditor.errors import EXIT_NOT_FOUND
from auditor.plugins.hufunet.detector import TAU_ACC
from auditor.plugins.hufunet.owner import hmac_key, load_hufunet, plant
from auditor.toolkit import data as datasets
from auditor.toolkit import models as zoo
from auditor.toolkit.training import EmbeddingCheckError, TrainConfig, train

pytestmark = pytest.mark.usefixtures("one_thread")


def _planted(secret: Path) -> tuple[Any, Any, Any, dict[str, Any]]:
    net, payload = load_hufunet(secret)
    model = zoo.build("cnn", width=2, seed=0)
    return model, plant(model, net, hmac_key(payload)), net, payload


def test_the_check_passes_after_frozen_training(hufunet_owner: SimpleNamespace) -> None:
    model, embedded, net, payload = _planted(hufunet_owner.secret)
    train(model, datasets.digits().train, TrainConfig(epochs=1, lr=1e-2, optimizer="adamw", weight_decay=0.1),
          after_step=embedded.frozen.after_step)  # fmt: skip
    embedded.frozen.detach()
    check = embedded.check(model, net, payload).require()
    assert check.measures["bit_identical_fraction"] == 1.0
    assert check.measures["acc_combined"] == pytest.approx(payload["acc_original"])  # EPH exactly the owner's
    assert check.measures["acc_combined_needed"] == pytest.approx(payload["acc_original"] * (1 - TAU_ACC))


def test_the_check_fails_when_the_loop_forgets_to_restore(hufunet_owner: SimpleNamespace) -> None:
    """Gradient hooks alone do not stop AdamW's weight decay: without ``after_step`` EPH moves."""
    model, embedded, net, payload = _planted(hufunet_owner.secret)
    train(model, datasets.digits().train, TrainConfig(epochs=1, lr=1e-2, optimizer="adamw", weight_decay=0.5))
    embedded.frozen.detach()
    check = embedded.check(model, net, payload)
    assert check.measures["bit_identical_fraction"] < 0.5
    with pytest.raises(EmbeddingCheckError, match=r"^hufunet: the watermark would not be found: only \d+\.\d\d% of "
                       "the EPH weights are bit-identical at the keyed positions"):  # fmt: skip
        check.require()


def test_a_damaged_eph_fails_on_acc_combined_unless_relaxed(hufunet_owner: SimpleNamespace) -> None:
    model, embedded, net, payload = _planted(hufunet_owner.secret)
    embedded.frozen.detach()
    with torch.no_grad():  # a third of EPH's kernels zeroed where they sit in the host
        for entry in embedded.frozen._entries:
            entry.param.view(-1)[entry.index[: len(entry.index) // 3]] = 0.0
    check = embedded.check(model, net, payload)
    acc = check.measures["acc_combined"]
    assert acc < payload["acc_original"] * (1 - TAU_ACC)
    assert any(f"Acc_combined is {acc:.2%}, not above the" in s for s in check.shortfalls)
    assert f"accept it with --min-acc-combined {acc:.4f}" in check.message()
    assert embedded.check(model, net, payload, min_acc_combined=acc, min_identical=0.0).passed


@pytest.mark.slow
def test_cli_checks_and_trains_in_bf16(
    tmp_path: Path, hufunet_owner: SimpleNamespace, run_cli: Callable[..., Any]
) -> None:
    """bf16 autocast on the CPU keeps EPH bit-identical through the embedder; an unreachable
    --min-acc-combined fails with exit 1 and writes nothing."""
    args: list[Any] = ["embed", "hufunet", "--hufunet", hufunet_owner.secret, "--epochs", "2", "--device", "cpu",
                       "--no-progress"]  # fmt: skip
    ok = run_cli(*args, "--out", tmp_path / "bf16", "--precision", "bf16", "--json")
    assert ok.code == 0, ok.stderr
    summary = json.loads(ok.stdout)
    assert summary["precision"] == "bf16" and summary["check"]["passed"]
    assert summary["check"]["bit_identical_fraction"] == 1.0
    assert summary["acc_combined"] == pytest.approx(summary["acc_original"])
    assert (tmp_path / "bf16" / "owner_bundle.json").is_file()

    failed = run_cli(*args, "--out", tmp_path / "strict", "--min-acc-combined", "1.0")
    assert failed.code == EXIT_NOT_FOUND, failed.stderr
    (line,) = failed.stderr.splitlines()
    assert line == (f"error: hufunet: the watermark would not be found: Acc_combined is "
                    f"{summary['acc_combined']:.2%}, below --min-acc-combined 1.0; accept it with "
                    f"--min-acc-combined {summary['acc_combined']:.4f}")  # fmt: skip
    assert not (tmp_path / "strict").exists() or not any((tmp_path / "strict").iterdir())
    bad = run_cli(*args, "--out", tmp_path / "bad", "--precision", "fp8")
    assert bad.code == 2 and "unknown precision 'fp8'" in bad.stderr

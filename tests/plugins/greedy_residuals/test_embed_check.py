"""Embedding checks itself (issue 20, item 2): at the end, every marked layer must carry the signature
bits the detector needs at its threshold, or the embedder writes nothing and exits 1.

The issue's case: ``auditor embed greedy-residuals --epochs 5`` on an owner's Conv1d model
(examples/sequences.py) left fc1 with about 150 of 256 bits and exited 0 without a word.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from auditor import keys
from auditor.errors import EXIT_NOT_FOUND
from auditor.plugins.greedy_residuals import stats
from auditor.plugins.greedy_residuals.detector import DEFAULT_P_THRESHOLD
from auditor.plugins.greedy_residuals.owner import GreedyResidualsWatermark, bits_needed
from auditor.toolkit import models as zoo
from auditor.toolkit.training import EmbeddingCheckError

pytestmark = pytest.mark.usefixtures("one_thread")

EXAMPLES = Path(__file__).resolve().parents[3] / "examples"
SEQUENCES = {"--model-factory": f"{EXAMPLES / 'sequences.py'}:model",
             "--data-factory": f"{EXAMPLES / 'sequences.py'}:data"}  # fmt: skip


@pytest.fixture(scope="module")
def key(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return keys.generate_keypair(tmp_path_factory.mktemp("keys"), algorithm="ed25519").private


@pytest.mark.parametrize("layers", [1, 2, 3, 5])
@pytest.mark.parametrize("threshold", [1e-6, 1e-3])
def test_bits_needed_is_the_detectors_bar(layers: int, threshold: float) -> None:
    """k = bits_needed passes the detector's rule (two-sided p x layers < threshold); k - 1 does not."""
    k = bits_needed(256, layers, threshold)

    def detected(matches: int) -> bool:
        return stats.two_sided_p(matches, 256).log10 + math.log10(layers) < math.log10(threshold)

    assert detected(k) and not detected(k - 1)
    assert bits_needed(256, layers) == bits_needed(256, layers, DEFAULT_P_THRESHOLD)


def test_the_python_check_measures_each_marked_layer(key: Path) -> None:
    torch.manual_seed(0)
    model = zoo.build("cnn", seed=0)
    wm = GreedyResidualsWatermark.create(model, private_key=keys.load_private_key(key), message="(c) check")
    check = wm.check(model)  # untrained: the residual signs are coin flips
    counts = {name: layer["bits"] for name, layer in check.measures["layers"].items()}
    assert set(counts) == {"conv2.weight", "conv3.weight"}
    assert counts == {n: round(r * 256) for n, r in wm.rates(model).items()}
    assert check.measures["bits_needed"] == bits_needed(256, 2) == 169
    assert not check.passed and len(check.shortfalls) == 2
    with pytest.raises(EmbeddingCheckError) as raised:
        check.require()
    assert raised.value.exit_code == EXIT_NOT_FOUND
    assert str(raised.value).startswith("greedy-residuals: the watermark would not be found: conv2.weight carries ")
    assert f"accept it with --min-bits {min(counts.values())}" in str(raised.value)
    assert wm.check(model, min_bits=min(counts.values())).passed  # relaxed to what is there
    assert not wm.check(model, min_bits=min(counts.values()) + 1).passed


@pytest.mark.slow
def test_the_issues_five_epoch_embed_fails_with_exit_1_and_writes_nothing(
    key: Path, tmp_path: Path, run_cli: Callable[..., Any]
) -> None:
    factories = [x for pair in SEQUENCES.items() for x in pair]
    args: list[Any] = ["embed", "greedy-residuals", "--key", key, "--message", "(c) sequences", "--epochs", "5",
                       "--device", "cpu", "--no-progress", *factories]  # fmt: skip
    failed = run_cli(*args, "--out", tmp_path / "five")
    assert failed.code == EXIT_NOT_FOUND, failed.stderr
    (line,) = failed.stderr.splitlines()
    assert line.startswith("error: greedy-residuals: the watermark would not be found: fc1.weight carries ")
    assert "signature bits, below the 169 the detector needs (p < 1e-06, 3 marked layers)" in line
    bits = int(line.split("fc1.weight carries ")[1].split("/")[0])
    assert 120 < bits < 169, line  # the issue saw 149; coin flips would give about 128
    assert line.endswith(f"accept it with --min-bits {bits}")
    assert not (tmp_path / "five").exists() or not any((tmp_path / "five").iterdir())

    relaxed = run_cli(*args, "--out", tmp_path / "relaxed", "--min-bits", str(bits), "--json")
    assert relaxed.code == 0, relaxed.stderr
    summary = json.loads(relaxed.stdout)
    assert summary["check"]["passed"] and summary["check"]["min_bits"] == bits
    assert summary["check"]["layers"]["fc1.weight"] == {"bits": bits, "of": 256}
    assert summary["check"]["bits_needed"] == 169
    assert (tmp_path / "relaxed" / "owner_bundle.json").is_file()

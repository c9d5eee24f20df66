"""auditor.toolkit.hf_tasks and examples/owner_transformers.py: transformers from configurations trained with
both watermarks on built-in tasks. Greedy Residuals' default rule picks MLP matrices, HufuNet's hosts are the
attention matrices (disjoint), EPH takes 1.5-13% of them; each architecture's owner is detected by both
detectors in its own save_pretrained folder, and a model trained independently by the same recipe is not."""

from __future__ import annotations

import itertools
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("transformers", reason="the optional extra hf is not installed")

from auditor.errors import UsageError
from auditor.toolkit import hf_tasks

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[2]
#: Where each architecture's MLP matrices live, in the names of transformers 4 and 5.
MLP = re.compile(r"\.(mlp|intermediate|output)\.")


def _eph_kernels() -> int:
    """K, the EPH kernels of a HufuNet of the default digits widths (one input channel)."""
    from auditor.plugins.hufunet.network import DIGITS_WIDTHS

    return sum(a * b for a, b in itertools.pairwise([1, *DIGITS_WIDTHS]))


@pytest.mark.parametrize("arch", hf_tasks.ARCHITECTURES)
def test_the_marks_go_to_disjoint_layers_and_eph_fits_the_papers_share(arch: str) -> None:
    from auditor.plugins.greedy_residuals.owner import default_layers
    from auditor.plugins.hufunet.owner import host_layers, kernel_total

    torch.manual_seed(0)
    model = hf_tasks.build(arch)
    marked = default_layers(model)
    hosts = hf_tasks.attention_layers(model)
    assert len(marked) == 3 and all(MLP.search(name) and "attention" not in name for name in marked), marked
    assert marked[0].split(".")[:-3] == marked[1].split(".")[:-3]  # two of the first block's MLP matrices
    assert len(hosts) == (4 if arch == "gpt2" else 8)  # GPT-2 fuses Q, K and V into c_attn
    assert not {f"{h}.weight" for h in hosts} & set(marked)
    share = _eph_kernels() / kernel_total(host_layers(model, hosts))
    assert 0.015 <= share <= 0.13, share


def test_each_task_draws_the_inputs_its_model_takes() -> None:
    for arch in hf_tasks.ARCHITECTURES:
        task = hf_tasks.task_for(arch)
        batch = task.batch(torch.Generator().manual_seed(0), 4)
        assert len(next(iter(batch.values()))) == 4
        torch.manual_seed(0)
        loss = task.loss(hf_tasks.build(arch, hf_tasks.Recipe(width=32, mlp=64)), batch)
        assert loss.ndim == 0 and torch.isfinite(loss)
    seq = hf_tasks.task_for("llama").batch(torch.Generator().manual_seed(0), 8)["input_ids"]
    step = (seq[:, 1] - seq[:, 0]) % hf_tasks.VOCAB
    assert ((seq[:, 1:] - seq[:, :-1]) % hf_tasks.VOCAB == step[:, None]).all() and set(step.tolist()) <= {1, 2, 3}


def test_the_loop_adds_the_penalty_and_calls_the_hook_after_every_step() -> None:
    torch.manual_seed(0)
    model = hf_tasks.build("gpt2", hf_tasks.Recipe(width=32, mlp=64))
    calls = {"penalty": 0, "hook": 0}

    def penalty(m: torch.nn.Module) -> torch.Tensor:
        calls["penalty"] += 1
        return 1e3 * m.get_parameter("transformer.h.0.mlp.c_fc.weight").square().sum()

    def hook(m: torch.nn.Module) -> None:
        calls["hook"] += 1
        assert m.training

    result = hf_tasks.train(model, hf_tasks.task_for("gpt2"), steps=3, penalty=penalty, after_step=hook)
    assert calls == {"penalty": 3, "hook": 3} and result["steps"] == 3 and result["loss"] > 1e2
    assert not model.training


def test_wrong_arguments_are_one_line_usage_errors() -> None:
    with pytest.raises(UsageError, match=r"^unknown transformer architecture 't5'; choose one of gpt2, llama"):
        hf_tasks.build("t5")
    with pytest.raises(UsageError, match=r"^steps must be 1 or more, not 0$"):
        hf_tasks.train(torch.nn.Linear(2, 2), hf_tasks.task_for("bert"), steps=0)
    with pytest.raises(UsageError, match="no linear layer under an attention module"):
        hf_tasks.attention_layers(torch.nn.Sequential(torch.nn.Linear(2, 2)))


def test_the_owners_guide_shows_the_example_verbatim_and_it_uses_public_names_only() -> None:
    source = (ROOT / "examples" / "owner_transformers.py").read_text()
    assert source in re.findall(r"```python\n(.*?)```", (ROOT / "docs" / "owners.md").read_text(), re.S)
    imports = re.findall(r"^from (auditor[\w.]*) import (.+)$", source, re.M)
    parts = [part for module, names in imports for part in [*module.split("."), *names.split(", ")]]
    assert imports and not any(part.startswith("_") for part in parts)


@pytest.fixture(scope="module")
def secret_hufunet(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A secret HufuNet with a fixed key (the example would draw a fresh one)."""
    from auditor.plugins.hufunet.owner import generate_hufunet

    path = tmp_path_factory.mktemp("hufunet") / "hufunet_secret.json"
    generate_hufunet(out=path, seed=0, hmac_key=bytes(range(32)))
    return path


@pytest.mark.slow
@pytest.mark.parametrize("arch", hf_tasks.ARCHITECTURES)
def test_the_owner_is_found_in_its_own_folder_and_an_independent_model_is_not(
    arch: str, tmp_path: Path, secret_hufunet: Path, run_cli: Any
) -> None:
    from auditor.audit.detect import run_detectors
    from auditor.audit.load import load_model
    from auditor.bundle import load_bundle
    from auditor.findings import Verdict

    out = tmp_path / "owner"
    out.mkdir()
    (out / "hufunet_secret.json").write_bytes(secret_hufunet.read_bytes())
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    result = subprocess.run([sys.executable, str(ROOT / "examples" / "owner_transformers.py"), arch, str(out)],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert {"config.json", "model.safetensors"} <= {p.name for p in (out / "release").iterdir()}
    bundles = ["--bundle", out / "gr_bundle.json", "--bundle", out / "hufunet_bundle.json"]
    owner = run_cli("audit", out / "release", *bundles, "--json")
    assert owner.code == 0, owner.stderr
    verdicts = {f["detector"]: f["verdict"] for f in json.loads(owner.stdout)["findings"]}
    assert verdicts == {"greedy-residuals": "detected", "hufunet": "detected"}

    torch.manual_seed(1)
    innocent = hf_tasks.build(arch)
    hf_tasks.train(innocent, hf_tasks.task_for(arch), seed=1)
    hf_tasks.save_pretrained(innocent, tmp_path / "innocent")
    owner_bundles = [load_bundle(out / "gr_bundle.json"), load_bundle(out / "hufunet_bundle.json")]
    findings = run_detectors(load_model(tmp_path / "innocent"), bundles=owner_bundles)
    assert {f.scheme: f.verdict for f in findings} == {
        "greedy-residuals": Verdict.NOT_DETECTED,
        "hufunet": Verdict.NOT_DETECTED,
    }

"""The owner examples of docs/owners.md run as a reader would run them, and what they release is detected.

Each example trains the owner's own model (examples/sequences.py, a Conv1d the package does not ship;
a tiny BERT built from a config for the Trainer one) in the owner's own loop, checks its watermark,
and writes the release and the bundles; the audit then finds every watermark in the released file.
The docs show each example verbatim.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from auditor.audit.detect import run_detectors
from auditor.audit.load import load_model
from auditor.bundle import load_bundle
from auditor.findings import Verdict

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"

#: example -> the bundles it writes (scheme by file name)
RELEASES = {
    "owner_greedy_residuals.py": {"owner_bundle.json": "greedy-residuals"},
    "owner_hufunet.py": {"owner_bundle.json": "hufunet"},
    "owner_both.py": {"gr_bundle.json": "greedy-residuals", "hufunet_bundle.json": "hufunet"},
    "owner_hf_trainer.py": {"gr_bundle.json": "greedy-residuals", "hufunet_bundle.json": "hufunet"},
}


def test_the_docs_show_every_example_verbatim() -> None:
    doc = (ROOT / "docs" / "owners.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", doc, re.S)
    for name in ["sequences.py", *RELEASES]:
        assert (EXAMPLES / name).read_text() in blocks, name


def test_the_examples_use_public_names_only() -> None:
    """No ``_private`` module or name of auditor: what an owner needs is public (and the owner's
    model and data need nothing of auditor at all)."""
    assert "auditor" not in re.sub(r'""".*?"""', "", (EXAMPLES / "sequences.py").read_text(), flags=re.S)
    for name in RELEASES:
        source = (EXAMPLES / name).read_text()
        imports = re.findall(r"^from (auditor[\w.]*) import (.+)$", source, re.M)
        assert imports, name
        for module, names in imports:
            assert not any(part.startswith("_") for part in module.split(".")), (name, module)
            assert not any(n.strip().startswith("_") for n in names.split(",")), (name, names)


@pytest.mark.slow
@pytest.mark.parametrize("example", sorted(RELEASES))
def test_example_runs_and_its_release_is_detected(example: str, tmp_path: Path, hufunet_owner: SimpleNamespace) -> None:
    out = tmp_path / "release"
    if "hufunet" in str(RELEASES[example].values()):
        out.mkdir()  # the tests' secret HufuNet stands in for `generate_hufunet` (the example skips it then)
        shutil.copy(hufunet_owner.secret, out / "hufunet_secret.json")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    result = subprocess.run([sys.executable, str(EXAMPLES / example), str(out)], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert {"model.safetensors", "model.pt", *RELEASES[example]} <= {p.name for p in out.iterdir()}
    graph = load_model(out / "model.safetensors")
    for bundle_file, scheme in RELEASES[example].items():
        bundle = load_bundle(out / bundle_file)
        assert bundle.scheme == scheme
        assert bundle.payload["model"]["sha256"] == load_bundle(out / bundle_file).payload["model"]["sha256"]
        (finding,) = [f for f in run_detectors(graph, bundles=[bundle]) if f.scheme == scheme]
        assert finding.verdict is Verdict.DETECTED, (example, bundle_file, finding.summary)
        if scheme == "hufunet":
            assert (out / bundle_file).stat().st_mode & 0o077 == 0  # the HufuNet bundle is secret
    assert "would not be found" not in result.stdout + result.stderr

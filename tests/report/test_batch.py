"""A batch's evidence: Holm-adjusted p-values over the batch (so that a sweep of innocents does not turn
chance into accusations), one Merkle root over the reports, and one attestation of the whole batch."""

from __future__ import annotations

import hashlib
import json
import math
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from auditor.report.batch import holm_log10, merkle_root


def holm_rejects(ps: list[float], alpha: float) -> set[int]:
    """Holm's procedure as stated: walk the p-values upwards, reject while p_(j) <= alpha / (m - j)."""
    order = sorted(range(len(ps)), key=lambda k: ps[k])
    rejected: set[int] = set()
    for j, k in enumerate(order):
        if ps[k] > alpha / (len(ps) - j):
            break
        rejected.add(k)
    return rejected


def test_holm_adjusted_p_values_reject_what_the_procedure_rejects() -> None:
    rng = random.Random(0)
    for m in (1, 2, 5, 30):
        ps = [rng.random() ** rng.choice([1, 4, 12]) for _ in range(m)]
        adjusted = holm_log10([math.log10(p) for p in ps])
        for alpha in (1e-6, 1e-3, 0.01, 0.05, 0.2, 0.5):
            assert {k for k, a in enumerate(adjusted) if a <= math.log10(alpha) + 1e-12} == holm_rejects(ps, alpha)
        assert all(a >= math.log10(p) - 1e-12 for a, p in zip(adjusted, ps, strict=True))
        assert max(adjusted) <= 0.0


def test_holm_works_in_logs_where_p_values_underflow() -> None:
    assert holm_log10([-400.0, -71.9, -0.5]) == pytest.approx([-400 + math.log10(3), -71.9 + math.log10(2), -0.5])


def test_merkle_root_is_rfc6962s_tree_hash() -> None:
    leaves = [hashlib.sha256(bytes([i])).hexdigest() for i in range(5)]

    def h(data: bytes) -> bytes:
        return hashlib.sha256(data).digest()

    hashed = [h(b"\x00" + bytes.fromhex(x)) for x in leaves]
    node01, node23 = h(b"\x01" + hashed[0] + hashed[1]), h(b"\x01" + hashed[2] + hashed[3])
    expected = h(b"\x01" + h(b"\x01" + node01 + node23) + hashed[4])  # RFC 6962 section 2.1: split at 4
    assert merkle_root(leaves) == expected.hex()
    assert merkle_root(leaves[:1]) == hashed[0].hex()
    assert merkle_root(leaves[::-1]) != merkle_root(leaves)


@pytest.fixture
def lenient_batch(
    gr_owner: SimpleNamespace, clean_model: Callable[..., Path], signer: Any, run_cli: Callable[..., Any],
    tmp_path: Path,
) -> SimpleNamespace:  # fmt: skip
    """Two watermarked copies and ten innocent models audited with a lenient threshold (p < 0.3), signed
    and attested as one batch."""
    folder = tmp_path / "suspects"
    folder.mkdir()
    for i in range(2):
        shutil.copy(gr_owner.files["safetensors"], folder / f"w{i}.safetensors")
    for i in range(10):
        clean_model(folder / f"n{i}.safetensors", seed=200 + i)
    out = tmp_path / "out"
    passphrase = signer.private.parent.parent / "pass.txt"
    code, stdout, stderr = run_cli(
        "audit", folder, "--bundle", gr_owner.out / "owner_bundle.json", "--out", out, "-j", "1", "--no-cache",
        "-O", "greedy-residuals.p_threshold=0.3", "--sign-key", signer.private, "--passphrase-file", passphrase,
        "--attest",
    )  # fmt: skip
    assert code == 0, stderr
    return SimpleNamespace(out=out, stdout=stdout, summary=json.loads((out / "summary.json").read_text()),
                           public=signer.public)  # fmt: skip


def test_a_sweep_of_innocents_does_not_turn_chance_into_accusations(lenient_batch: SimpleNamespace) -> None:
    rows = {r["name"]: r for r in lenient_batch.summary["suspects"]}
    chance = [n for n, r in rows.items() if n.startswith("n") and r["verdict"] == "detected"]
    assert chance  # at p < 0.3, some of ten innocents come out "detected" on their own...
    surviving = [n for n, r in rows.items() if any(f["survives"] for f in r["findings"])]
    assert surviving == ["w0.safetensors", "w1.safetensors"]  # ...and none of them survives Holm over the batch
    control = lenient_batch.summary["error_control"]
    assert (control["detected"], control["survive"]) == (2 + len(chance), 2)
    for r in rows.values():
        f = r["findings"][0]
        assert f["log10_p_holm"] >= f["log10_p"]
    assert f"batch-wide (Holm): 2 of {2 + len(chance)} detections survive" in lenient_batch.stdout
    page = (lenient_batch.out / "summary.html").read_text()
    assert f"2 of {2 + len(chance)} findings survive" in page
    assert page.count('class="holm survives"') == 2


def test_the_batch_attestation_binds_every_report_through_the_merkle_root(
    lenient_batch: SimpleNamespace, run_cli: Callable[..., Any]
) -> None:
    out, summary = lenient_batch.out, lenient_batch.summary
    leaves = [r["evidence_sha256"] for r in summary["suspects"]]
    assert summary["merkle"]["root"] == merkle_root(leaves) and summary["merkle"]["leaves"] == 12
    att = out / "summary.intoto.jsonl"
    code, stdout, _ = run_cli("report", "verify", att, "--public-key", lenient_batch.public)
    assert code == 0 and stdout.startswith("intact:") and "Merkle root over 12 reports" in stdout, stdout

    report = out / "n3.safetensors.json"
    original = report.read_bytes()
    data = json.loads(original)
    data["verdict"] = "inconclusive"  # one report altered after the fact
    report.write_text(json.dumps(data))
    code, stdout, _ = run_cli("report", "verify", att, "--public-key", lenient_batch.public)
    assert code == 1 and "the report n3.safetensors.json does not verify" in stdout, stdout
    report.write_bytes(original)

    other = out / "w1.safetensors.json"
    shutil.copy(other, report)  # a report swapped for another, intact one
    shutil.copy(out / "w1.safetensors.html", out / "n3.safetensors.html")
    code, stdout, _ = run_cli("report", "verify", att, "--public-key", lenient_batch.public)
    assert code == 1 and "altered: n3.safetensors.json is not the report its summary row gives" in stdout, stdout

"""A bundle-free finding that answers another question than a watermark's (``Detector.evidence``) is shown beside
the verdict as its own line, never as "watermark found", and leaves the verdict and the exit code alone."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from pathlib import Path
from types import SimpleNamespace
from typing import Any, ClassVar

import pytest

from auditor import Detector, Finding, LayerGraph, Verdict, hookimpl
from auditor.audit.detect import evidence_answer, overall_verdict
from auditor.errors import EXIT_INCONCLUSIVE, EXIT_NOT_FOUND, EXIT_OK

ASSETS = Path(__file__).resolve().parent.parent / "assets"


class Kinship(Detector):
    """A throwaway bundle-free detector that answers its own question, as a third party would write it."""

    id = "test-kinship"
    title = "Kinship check"
    evidence = "related to a known model"
    p_metric = "log10_p"
    answer: ClassVar[Verdict] = Verdict.DETECTED

    def detect(self, suspect: LayerGraph, *, bundle: Any | None, context: Mapping[str, Any]) -> list[Finding]:
        return [Finding(detector=self.id, verdict=self.answer, summary="The suspect is related.",
                        metrics={"log10_p": -4.0})]  # fmt: skip


class Plain(Detector):
    """A bundle-free check that declares no question of its own (shown as before)."""

    id = "test-plain"

    def detect(self, suspect: LayerGraph, *, bundle: Any | None, context: Mapping[str, Any]) -> list[Finding]:
        return [Finding(detector=self.id, verdict=Verdict.DETECTED, summary="Plain.")]


def _module(*detectors: Detector) -> SimpleNamespace:
    @hookimpl
    def register_detectors(register: Callable[[Any], None]) -> None:
        for d in detectors:
            register(d)

    return SimpleNamespace(register_detectors=register_detectors)


def _first_screen(html: str) -> str:
    return html.split('<header class="verdict', 1)[1].split("</header>", 1)[0]


ANSWERS = [(Verdict.DETECTED, "yes"), (Verdict.NOT_DETECTED, "no"), (Verdict.INCONCLUSIVE, "untested"),
           (Verdict.ERROR, "untested")]  # fmt: skip


@pytest.mark.parametrize(("answer", "word"), ANSWERS)
def test_the_answer_follows_the_findings_verdict(answer: Verdict, word: str) -> None:
    finding = Finding(detector="test-kinship", verdict=answer, summary="")
    assert evidence_answer(finding, Kinship()) == {"question": "related to a known model", "answer": word}
    assert evidence_answer(finding, None) is None
    assert evidence_answer(Finding(detector="test-plain", verdict=answer, summary=""), Plain()) is None
    marked = Finding(detector="test-kinship", verdict=answer, summary="", scheme="some-scheme")
    assert evidence_answer(marked, Kinship()) is None  # a watermark finding is never a separate line


def test_a_yes_never_decides_the_watermark_verdict() -> None:
    related = Finding(detector="test-kinship", verdict=Verdict.DETECTED, summary="")
    mark = Finding(detector="mark", scheme="some-scheme", verdict=Verdict.NOT_DETECTED, summary="")
    assert overall_verdict([related, mark]) is Verdict.NOT_DETECTED
    assert overall_verdict([related]) is Verdict.INCONCLUSIVE  # nothing looked for a watermark


def test_the_first_screen_shows_it_beside_the_verdict_and_the_exit_code_stays(
    tmp_path: Path, plugin: Callable[..., Any], audit: Callable[..., Any]
) -> None:
    code_before, before, _ = audit(ASSETS / "st_cnn.safetensors", tmp_path / "before")
    with plugin(_module(Kinship(), Plain())):
        code, report, html = audit(ASSETS / "st_cnn.safetensors", tmp_path / "after")
    assert code == code_before == EXIT_INCONCLUSIVE and report["verdict"] == before["verdict"] == "inconclusive"
    assert report["evidence"] == [{
        "detector": "test-kinship", "title": "Kinship check", "question": "related to a known model",
        "answer": "yes", "log10_p": -4.0, "p_label": "p", "headline": "The suspect is related.",
    }]  # fmt: skip
    by_id = {f["detector"]: f for f in report["findings"]}
    assert by_id["test-kinship"]["evidence"] == {"question": "related to a known model", "answer": "yes"}
    assert "evidence" not in by_id["test-plain"]
    screen = _first_screen(html)
    assert re.search(r'Related to a known model: <span class="answer">yes</span></b> \(p = 10\^-4, p\)', screen)
    assert "does not decide the verdict above or the exit code" in screen
    glance = html.split('id="at-a-glance"', 1)[1].split("</section>", 1)[0]
    kinship_row = next(r for r in glance.split("<tr>") if "test-kinship" in r)
    assert "related to a known model: yes" in kinship_row and "watermark found" not in kinship_row
    plain_row = next(r for r in glance.split("<tr>") if "test-plain" in r)
    assert "watermark found" in plain_row  # a check without its own question is shown as before
    article = html.split('id="findings"', 1)[1]
    assert '<span class="badge">related to a known model: yes</span>' in article
    assert 'A separate line of evidence: "related to a known model" is not "carries the owner\'s watermark"' in article


def test_without_such_a_detector_the_report_has_no_evidence_lines(tmp_path: Path, audit: Callable[..., Any]) -> None:
    _, report, html = audit(ASSETS / "st_cnn.safetensors", tmp_path / "r")
    assert report["evidence"] == []  # no --reference: the built-in lineage test says nothing
    assert 'class="evidence"' not in html


@pytest.mark.slow
def test_a_watermark_and_the_lineage_answer_stand_side_by_side(
    gr_owner: SimpleNamespace, tmp_path: Path, clean_model: Callable[..., Path], audit: Callable[..., Any]
) -> None:
    bundle, released = gr_owner.out / "owner_bundle.json", gr_owner.files["safetensors"]
    code, report, html = audit(released, "--bundle", bundle, "--reference", released, tmp_path / "found")
    assert code == EXIT_OK and report["verdict"] == "detected"
    assert [(e["detector"], e["answer"]) for e in report["evidence"]] == [("lineage", "yes")]
    screen = _first_screen(html)
    assert screen.index("Verdict: watermark found") < screen.index("Derived from the reference: ")
    innocent = clean_model(tmp_path / "innocent.safetensors", seed=3)
    code, report, html = audit(innocent, "--bundle", bundle, "--reference", released, tmp_path / "innocent")
    assert code == EXIT_NOT_FOUND and report["verdict"] == "not-detected"
    assert [(e["detector"], e["answer"]) for e in report["evidence"]] == [("lineage", "no")]
    assert 'Derived from the reference: <span class="answer">no</span>' in _first_screen(html)


def test_a_batch_summary_gives_the_answer_not_a_watermark_verdict(tmp_path: Path, run_cli: Callable[..., Any]) -> None:
    reference = ASSETS / "st_cnn.safetensors"
    suspects = [tmp_path / "a.safetensors", tmp_path / "b.safetensors"]
    for s in suspects:
        s.write_bytes(reference.read_bytes())
    code, stdout, stderr = run_cli("audit", *suspects, "--reference", reference, "--out", tmp_path / "out")
    assert code == EXIT_INCONCLUSIVE, stderr  # no owner bundle: nothing decides a watermark verdict
    assert stdout.count("inconclusive (lineage: derived from the reference: yes)") == 2, stdout
    page = (tmp_path / "out" / "summary.html").read_text()
    assert page.count("derived from the reference: yes") == 2
    assert "watermark found" not in page.split("<tbody>", 1)[1]


def test_the_terminal_line_gives_the_answer(run_cli: Callable[..., Any]) -> None:
    model = ASSETS / "st_cnn.safetensors"
    code, stdout, _ = run_cli("audit", model, "--reference", model)
    assert code == EXIT_INCONCLUSIVE
    lines = stdout.splitlines()
    assert any(
        re.fullmatch(r"lineage: derived from the reference: yes: p = .+; 2 of 2 layers derived", x) for x in lines
    )
    assert "lineage: detected" not in stdout and lines[-1] == "verdict: inconclusive"

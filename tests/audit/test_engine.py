"""The local engine: a pool of worker processes gives the batch the same findings as one process, and a
worker killed in the middle of a batch costs nothing but time."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from auditor.audit.engine import Engine, TaskFailed, run_tasks
from auditor.errors import UsageError


def outcome(summary: dict[str, Any]) -> list[tuple[Any, ...]]:
    """What must not depend on the engine: per row the file, verdict, exit code, findings, error and the
    report's evidence hash; and the batch's Merkle root, counts and error control."""
    rows = [
        (r["name"], r["verdict"], r["exit_code"], repr(r.get("findings")), r["error"], r.get("evidence_sha256"))
        for r in summary["suspects"]
    ]
    return [*rows, (summary["merkle"]["root"], repr(summary["counts"]), repr(summary["error_control"]))]


def test_the_reference_batch_finds_what_the_folder_holds(
    reference_summary: dict[str, Any], suspect_folder: SimpleNamespace
) -> None:
    rows = {r["name"]: r for r in reference_summary["suspects"]}
    assert [n for n, r in rows.items() if r["verdict"] == "detected"] == suspect_folder.watermarked
    assert [n for n, r in rows.items() if r["verdict"] == "not-detected"] == suspect_folder.innocent
    assert (rows["x_hostile.pt"]["exit_code"], rows["x_truncated.safetensors"]["exit_code"]) == (5, 4)
    assert reference_summary["exit_code"] == 5
    assert reference_summary["error_control"]["survive"] == len(suspect_folder.watermarked)
    assert reference_summary["merkle"]["leaves"] == 18


def test_two_processes_give_the_same_findings(
    audit_folder: Callable[..., dict[str, Any]], reference_summary: dict[str, Any], tmp_path: Path
) -> None:
    from auditor.report.html import render_html
    from auditor.report.seal import verify_report

    summary = audit_folder(engine=Engine("local", jobs=2), out_dir=tmp_path)
    assert outcome(summary) == outcome(reference_summary)
    assert summary["run"]["engine"] == "local (2 processes)"
    for row in summary["suspects"]:
        if row["report"] is None:
            continue
        js, page = tmp_path / row["report"]["json"], tmp_path / row["report"]["html"]
        assert verify_report(js, html=page).intact
        sealed = json.loads(js.read_text())
        seal = sealed.pop("integrity")
        preview = {"content_sha256": seal["content_sha256"], "evidence_sha256": seal["evidence_sha256"], "signer": None}
        # The page a worker rendered is the one the driver would have rendered from the sealed data.
        assert render_html(sealed, template="report.html.j2", seal=preview) == page.read_text()


def test_a_killed_worker_costs_nothing_but_time(
    audit_folder: Callable[..., dict[str, Any]], reference_summary: dict[str, Any]
) -> None:
    killed: list[int] = []
    seen: list[str] = []

    def kill_one_worker(row: dict[str, Any]) -> None:
        seen.append(row["path"])
        workers = [p.pid for p in multiprocessing.active_children() if p.pid is not None]
        if len(seen) == 3 and workers:  # the pool's workers are this process's children
            os.kill(workers[0], signal.SIGKILL)
            killed.append(workers[0])

    summary = audit_folder(engine=Engine("local", jobs=2), on_row=kill_one_worker)
    assert killed
    assert len(seen) == len(set(seen)) == 20  # every suspect reported, none twice
    for got, expected in zip(summary["suspects"], reference_summary["suspects"], strict=True):
        assert {k: got.get(k) for k in expected if k != "content_sha256" and got.get(k) != expected[k]} == {}
    assert outcome(summary) == outcome(reference_summary)


def _double(x: int) -> int:
    if x == 3:
        raise ValueError("three")
    return 2 * x


def test_run_tasks_yields_each_index_once_and_a_failed_task_in_its_place() -> None:
    results = dict(run_tasks(_double, range(6), engine=Engine("local", jobs=2)))
    assert sorted(results) == list(range(6))
    assert results[3] == TaskFailed("internal error: ValueError: three")
    assert [results[i] for i in (0, 1, 2, 4, 5)] == [0, 2, 4, 8, 10]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": "spark"}, "--engine 'spark': choose one of local, ray"),
        ({"name": "local", "jobs": 0}, "-j 0: give at least one job"),
        ({"name": "local", "address": "auto"}, "--ray-address goes with --engine ray"),
    ],
)
def test_engine_choices_are_checked(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(UsageError) as caught:
        Engine(**kwargs)
    assert str(caught.value) == message

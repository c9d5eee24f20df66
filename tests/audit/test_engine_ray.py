"""The Ray engine on a real local cluster (2 CPUs, started once for this module): the 20 suspects give the
same findings as in one process, and a Ray worker killed in the middle of the batch is replaced (Ray runs
its task again) with nothing lost and nothing reported twice."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Callable
from typing import Any

import pytest

from auditor.audit.engine import Engine

pytest.importorskip("ray")


def outcome(summary: dict[str, Any]) -> list[tuple[Any, ...]]:
    """What must not depend on the engine (as in test_engine.py)."""
    rows = [
        (r["name"], r["verdict"], r["exit_code"], repr(r.get("findings")), r["error"], r.get("evidence_sha256"))
        for r in summary["suspects"]
    ]
    return [*rows, (summary["merkle"]["root"], repr(summary["counts"]), repr(summary["error_control"]))]


def test_ray_gives_the_findings_of_one_process(
    ray_cluster: str, audit_folder: Callable[..., dict[str, Any]], reference_summary: dict[str, Any]
) -> None:
    summary = audit_folder(engine=Engine("ray", address=ray_cluster))
    assert outcome(summary) == outcome(reference_summary)
    assert summary["run"]["engine"] == f"ray ({ray_cluster})"


def test_a_killed_ray_worker_loses_nothing(
    ray_cluster: str,
    audit_folder: Callable[..., dict[str, Any]],
    reference_summary: dict[str, Any],
    processes_named: Callable[[str], list[int]],
) -> None:
    killed: list[int] = []
    seen: list[str] = []

    def kill_a_busy_worker(row: dict[str, Any]) -> None:
        seen.append(row["path"])
        busy = processes_named("ray::suspect_task")  # Ray titles a worker by the task it runs
        if not killed and len(seen) >= 2 and busy:
            os.kill(busy[0], signal.SIGKILL)
            killed.append(busy[0])

    summary = audit_folder(engine=Engine("ray", address=ray_cluster), on_row=kill_a_busy_worker)
    assert killed, "no Ray worker was busy when results arrived"
    assert len(seen) == len(set(seen)) == 20
    assert outcome(summary) == outcome(reference_summary)


def untimed(value: Any) -> Any:
    """``value`` (JSON-ready) without its timings (``seconds``), which no two runs share."""
    if isinstance(value, dict):
        return {k: untimed(v) for k, v in value.items() if k != "seconds"}
    return [untimed(v) for v in value] if isinstance(value, list) else value


def test_evaluate_runs_the_grid_cells_as_ray_tasks(
    ray_cluster: str, suspect_folder: Any, gr_owner: Any, tmp_path: Any
) -> None:
    from auditor.plugins.attacks.evaluate import evaluate_model

    def cells(**kwargs: Any) -> list[dict[str, Any]]:
        results = evaluate_model(model=gr_owner.files["safetensors"], bundles=[suspect_folder.bundle],
                                 reference=gr_owner.files["safetensors"], grid="quick",
                                 attacks=["prune-magnitude", "permute"], **kwargs)  # fmt: skip
        return [untimed(c) for c in results["cells"]]

    here = cells(out_dir=tmp_path / "here")
    on_ray = cells(out_dir=tmp_path / "ray", engine=Engine("ray", address=ray_cluster))
    assert [c["status"] for c in on_ray] == ["ok"] * len(here)
    here = json.loads(json.dumps(here, default=str))
    for got, expected in zip(on_ray, here, strict=True):
        assert {k: (got.get(k), v) for k, v in expected.items() if got.get(k) != v} == {}, got["label"]
    assert len(on_ray) == 4  # the model as released, the permutation, two prunings

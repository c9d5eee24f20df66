"""Fixtures of the batch-engine tests: a folder of 20 suspects, the batch's inputs, the reference result of
auditing them in this process, and one local Ray cluster per module that asks for it."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

ASSETS = Path(__file__).resolve().parent.parent / "assets"
WATERMARKED = 6
INNOCENT = 12


def _resave(source: Path, target: Path, copy: int) -> None:
    """``source``'s tensors saved again with metadata of their own: the same weights, other bytes."""
    from safetensors.torch import load_file, save_file

    save_file(load_file(str(source)), str(target), metadata={"copy": str(copy)})


@pytest.fixture(scope="session")
def suspect_folder(
    gr_owner: SimpleNamespace, clean_model: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory
) -> SimpleNamespace:
    """20 suspects: 6 copies of the GR owner's watermarked model (5 re-saved with other bytes, one as a
    PyTorch file), 12 independently initialised models of the same architecture, a hostile pickle (it
    runs os.system when unpickled) and a truncated copy of the watermarked file."""
    import torch

    folder = tmp_path_factory.mktemp("suspects20")
    source = Path(gr_owner.files["safetensors"])
    marked = []
    for i in range(WATERMARKED - 1):
        _resave(source, folder / f"w{i}.safetensors", i)
        marked.append(f"w{i}.safetensors")
    torch.save(gr_owner.model.state_dict(), folder / "w_pt.pt")
    marked.append("w_pt.pt")
    innocent = []
    for i in range(INNOCENT):
        clean_model(folder / f"n{i:02d}.safetensors", seed=100 + i)
        innocent.append(f"n{i:02d}.safetensors")
    shutil.copy(ASSETS / "pt_os_system.pt", folder / "x_hostile.pt")
    (folder / "x_truncated.safetensors").write_bytes(source.read_bytes()[:4000])
    paths = sorted(folder.iterdir())
    assert len(paths) == 20
    return SimpleNamespace(folder=folder, paths=paths, watermarked=marked, innocent=innocent,
                           bundle=gr_owner.out / "owner_bundle.json")  # fmt: skip


@pytest.fixture(scope="session")
def batch_inputs(suspect_folder: SimpleNamespace) -> Any:
    """The owner's bundle loaded as an audit's inputs."""
    from auditor.audit.pipeline import load_inputs

    return load_inputs(bundles=[suspect_folder.bundle], reference=None)


@pytest.fixture(scope="session")
def audit_folder(suspect_folder: SimpleNamespace) -> Callable[..., dict[str, Any]]:
    """``audit_folder(engine=None, cache=None, on_row=None, out_dir=None)``: the 20 suspects audited as
    one batch with the owner's bundle (a fresh copy of the inputs each call); the sealed summary."""
    from auditor.audit.pipeline import load_inputs
    from auditor.report.batch import audit_batch, report_names
    from auditor.report.document import run_block

    def run(**kwargs: Any) -> dict[str, Any]:
        inputs = load_inputs(bundles=[suspect_folder.bundle], reference=None)
        paths = suspect_folder.paths
        return audit_batch(paths, report_names(paths), inputs=inputs, run=run_block(case_id="T"),
                           command="auditor audit suspects", **kwargs)  # fmt: skip

    return run


@pytest.fixture(scope="session")
def reference_summary(audit_folder: Callable[..., dict[str, Any]]) -> dict[str, Any]:
    """The 20 suspects audited one after the other in this process: what every engine must give."""
    from auditor.audit.engine import Engine

    return audit_folder(engine=Engine("local", jobs=1))


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[str]:
    """A Ray cluster of 2 CPUs on this machine (no dashboard) for the module; its GCS address."""
    ray = pytest.importorskip("ray")
    os.environ.setdefault("RAY_DISABLE_USAGE_STATS", "1")
    context = ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        yield str(context.address_info["gcs_address"])
    finally:
        ray.shutdown()


def _proc_cmdline(pid: str) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _parent(pid: str) -> int:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0
    return int(stat.rsplit(")", 1)[1].split()[1])  # the field after the command name's parenthesis


def _descendants(root: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for p in os.listdir("/proc"):
        if p.isdigit():
            children.setdefault(_parent(p), []).append(int(p))
    found, todo = set(), [root]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


@pytest.fixture(scope="session")
def processes_named() -> Callable[[str], list[int]]:
    """``processes_named(prefix)``: the ids of this test process's descendants (never another run's) whose
    command line starts with ``prefix`` (Ray names a worker running a task ``ray::FUNCTION``)."""

    def find(prefix: str) -> list[int]:
        if not Path("/proc").is_dir():
            pytest.skip("needs /proc")
        return sorted(p for p in _descendants(os.getpid()) if _proc_cmdline(str(p)).startswith(prefix))

    return find

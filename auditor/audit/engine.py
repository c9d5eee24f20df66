"""Where a batch's tasks run: a local process pool (``--engine local``, ``-j N``) or a Ray cluster
(``--engine ray``, ``pip install auditor[ray]``).

:func:`run_tasks` runs one function over many items and yields ``(index, result)`` as each task
completes, whatever the engine; a task that could not finish yields a :class:`TaskFailed` in its place,
never an exception, so that one file cannot lose the others. The function must be a module-level
function (both engines send it by name) that takes and returns plain data: paths, strings, JSON text.
Nothing but that crosses between the driver and a worker; a worker never unpickles a model file (it
loads suspects with the same safe loaders and parse budgets as a single audit).

* **local**: ``jobs`` worker processes (default: the CPU cores this process may use), started fresh
  (``spawn``, so that no thread state of the driver is copied), each with one torch thread per core it
  has. One job, or one item, runs in this process. A worker that dies (killed, out of memory) breaks
  the pool: the pool is started again and the tasks that were running are tried again, up to
  ``retries`` more times each; then they are reported as failed.
* **ray**: each item is one Ray task (one CPU, plus one GPU where the caller asks and the cluster has
  one). ``address`` is ``None`` (a Ray instance on this machine, started and stopped here, or the one
  this process already joined), ``auto`` (the cluster this machine belongs to) or
  ``ray://HOST:PORT`` (Ray client). Ray itself runs a task again when its worker or node is lost
  (``retries`` times); a result that arrives twice is yielded once.

Ray is imported only when it is asked for: importing this module costs nothing.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from auditor.errors import UsageError

__all__ = ["DEFAULT_RETRIES", "ENGINES", "Engine", "TaskFailed", "cluster_has_gpu", "default_jobs", "run_tasks"]

ENGINES = ("local", "ray")
#: How many more times a task whose worker died is tried before it is reported as failed.
DEFAULT_RETRIES = 2
RAY_MISSING = "--engine ray needs Ray: pip install 'auditor[ray]'"


def default_jobs() -> int:
    """The number of CPU cores this process may run on (the local engine's default ``-j``)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


@dataclass(frozen=True)
class Engine:
    """Which engine runs the tasks: ``name`` (local or ray), ``jobs`` (local: worker processes, default the
    cores; ray: tasks in flight at once, default twice the cluster's CPUs) and ``address`` (ray only)."""

    name: str = "local"
    jobs: int | None = None
    address: str | None = None
    retries: int = DEFAULT_RETRIES

    def __post_init__(self) -> None:
        if self.name not in ENGINES:
            raise UsageError(f"--engine {self.name!r}: choose one of {', '.join(ENGINES)}")
        if self.jobs is not None and self.jobs < 1:
            raise UsageError(f"-j {self.jobs}: give at least one job")
        if self.address is not None and self.name != "ray":
            raise UsageError("--ray-address goes with --engine ray")

    def describe(self) -> str:
        """The engine in words, for the summary and the console."""
        if self.name == "ray":
            return f"ray ({self.address or 'local instance'})"
        jobs = self.jobs or default_jobs()
        return f"local ({jobs} process{'es' if jobs != 1 else ''})"


@dataclass(frozen=True)
class TaskFailed:
    """What takes a task's result when it could not finish: why, in one line."""

    message: str


def run_tasks(
    fn: Callable[[Any], Any],
    items: Iterable[Any],
    *,
    engine: Engine | None = None,
    resources: Callable[[Any], Mapping[str, float]] | None = None,
) -> Iterator[tuple[int, Any]]:
    """Run ``fn`` on each of ``items`` on ``engine`` and yield ``(index, result)`` as tasks complete (each
    index once; a :class:`TaskFailed` where a task raised or its worker was lost past the retries).
    ``resources(item)`` may ask Ray for ``{"num_gpus": 1}`` (see :func:`cluster_has_gpu`); the local
    engine ignores it. Closing the iterator early (or Ctrl-C) stops the workers."""
    engine = engine or Engine()
    work = list(items)
    if engine.name == "ray":
        yield from _run_ray(fn, work, engine, resources)
        return
    jobs = min(engine.jobs or default_jobs(), len(work))
    if jobs <= 1:
        yield from _run_here(fn, work)
    else:
        yield from _run_pool(fn, work, jobs, engine.retries)


def _failure(exc: BaseException) -> TaskFailed:
    return TaskFailed(f"internal error: {type(exc).__name__}: {exc}")


def _run_here(fn: Callable[[Any], Any], work: list[Any]) -> Iterator[tuple[int, Any]]:
    for i, item in enumerate(work):
        try:
            result = fn(item)
        except Exception as exc:  # the task's own bug: its row says so, the others go on
            result = _failure(exc)
        yield i, result


def _worker_init(threads: int) -> None:
    """A pool worker ignores Ctrl-C (the driver stops it) and uses ``threads`` torch threads."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.environ["OMP_NUM_THREADS"] = str(threads)
    try:
        import torch

        torch.set_num_threads(threads)
    except ImportError:  # pragma: no cover - torch is a dependency
        pass


def _run_pool(fn: Callable[[Any], Any], work: list[Any], jobs: int, retries: int) -> Iterator[tuple[int, Any]]:
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
    from concurrent.futures.process import BrokenProcessPool

    todo = list(range(len(work)))  # not yet submitted, in order
    lost: dict[int, int] = {}  # index -> times its worker died
    threads = max(1, default_jobs() // jobs)
    context = multiprocessing.get_context("spawn")
    while todo:
        pool = ProcessPoolExecutor(jobs, mp_context=context, initializer=_worker_init, initargs=(threads,))
        running: dict[Future[Any], int] = {}
        broken = clean = False
        try:
            while (todo or running) and not broken:
                while todo and len(running) < 2 * jobs:  # a window: a million items are never all queued
                    try:
                        future = pool.submit(fn, work[todo[0]])
                    except BrokenProcessPool:  # a worker died before this item was queued: it never ran
                        broken = True
                        break
                    running[future] = todo.pop(0)
                if broken:
                    break
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in sorted(done, key=running.__getitem__):
                    exc = future.exception()
                    if isinstance(exc, BrokenProcessPool):
                        broken = True  # counted with the others still running below
                        continue
                    yield running.pop(future), (_failure(exc) if exc is not None else future.result())
            if broken:
                # A worker died: every task still running is tried again, in order, unless it already was.
                again = []
                for i in sorted(running.values()):
                    lost[i] = lost.get(i, 0) + 1
                    if lost[i] > retries:
                        yield (
                            i,
                            TaskFailed(
                                f"the worker auditing it died {lost[i]} times (killed or out of memory; another file"
                                " audited at the same time may be the cause)"
                            ),
                        )
                    else:
                        again.append(i)
                todo = again + todo
            clean = not broken
        finally:
            # Stopped early (Ctrl-C, the caller closed us) or broken: no worker may outlive this run.
            processes = list((getattr(pool, "_processes", None) or {}).values())
            pool.shutdown(wait=clean, cancel_futures=True)
            if not clean:
                for process in processes:
                    if process.is_alive():
                        process.terminate()


# --------------------------------------------------------------------------- ray


def _ray() -> Any:
    try:
        import ray
    except ImportError:
        raise UsageError(RAY_MISSING) from None
    return ray


def _connect(address: str | None) -> bool:
    """Join (or start) the Ray cluster; whether this call started it (and so must stop it)."""
    import logging

    ray = _ray()
    if ray.is_initialized():
        return False
    _probe(address)
    try:
        ray.init(address=address, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR,
                 configure_logging=True)  # fmt: skip
    except (ConnectionError, RuntimeError, ValueError, TimeoutError) as exc:
        raise UsageError(f"--ray-address {address or '(local)'}: cannot reach a Ray cluster: {exc}") from None
    return True


def _probe(address: str | None, timeout: float = 5.0) -> None:
    """Refuse, in one line and seconds, a ``HOST:PORT`` (or ``ray://HOST:PORT``) nothing listens at: Ray itself
    would retry for minutes, writing warnings. ``auto`` and no address are left to Ray."""
    import socket

    if not address or address == "auto":
        return
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise UsageError(f"--ray-address {address}: write it as auto, HOST:PORT or ray://HOST:PORT")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as exc:
        raise UsageError(f"--ray-address {address}: cannot reach a Ray cluster: {exc.strerror or exc}") from None


def cluster_has_gpu() -> bool:
    """Whether the Ray cluster this process joined has a GPU (connect first, as :func:`run_tasks` does)."""
    ray = _ray()
    return ray.is_initialized() and float(ray.cluster_resources().get("GPU", 0)) > 0


def _run_ray(
    fn: Callable[[Any], Any], work: list[Any], engine: Engine, resources: Callable[[Any], Mapping[str, float]] | None
) -> Iterator[tuple[int, Any]]:
    ray = _ray()
    started = _connect(engine.address)
    running: dict[Any, int] = {}
    try:
        remote = ray.remote(num_cpus=1, max_retries=engine.retries, retry_exceptions=False)(fn)
        window = engine.jobs or max(2, 2 * int(ray.cluster_resources().get("CPU", 1)))
        todo = list(range(len(work)))
        given: set[int] = set()
        while todo or running:
            while todo and len(running) < window:
                i = todo.pop(0)
                extra = dict(resources(work[i])) if resources is not None else {}
                running[(remote.options(**extra) if extra else remote).remote(work[i])] = i
            ready, _ = ray.wait(list(running), num_returns=1)
            for ref in ready:
                i = running.pop(ref)
                result = _ray_result(ray, ref)
                if i not in given:  # a task Ray ran twice (a lost node) is reported once
                    given.add(i)
                    yield i, result
    finally:
        for ref in running:  # stopped early: what is still running is of no use
            ray.cancel(ref, force=True)
        if started:
            ray.shutdown()


def _ray_result(ray: Any, ref: Any) -> Any:
    from ray import exceptions as rex

    try:
        return ray.get(ref)
    except rex.RayTaskError as exc:  # the task raised: the cause, not Ray's traceback
        cause = exc.as_instanceof_cause() if hasattr(exc, "as_instanceof_cause") else exc
        return TaskFailed(f"internal error: {type(cause).__name__}: {str(cause).splitlines()[-1][:300]}")
    except (rex.WorkerCrashedError, rex.NodeDiedError, rex.ObjectLostError, rex.OwnerDiedError) as exc:
        return TaskFailed(f"the Ray worker or node auditing it was lost past its retries ({type(exc).__name__})")
    except rex.RayError as exc:
        return TaskFailed(f"Ray could not run it: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}")

"""Where the trials of a comparison run: execution backends, chosen by name.

- ``local``: in this process, one trial after another (``workers <= 1``), or in a pool of
  ``workers`` spawned processes.
- ``ray``: each trial is a Ray task. Without ``address``, a local Ray instance is started
  (``num_cpus=workers`` when ``workers > 1``, else every core) and shut down afterwards;
  with ``address`` (``HOST:PORT`` of a head node) the sweep runs on that existing cluster.
  If Ray is already initialised in this process (a notebook, the tests), that instance is
  used as it is.

Both backends yield ``(trial, row)`` as trials finish; :func:`blackbox_sat.harness.compare.compare`
stores the rows and rebuilds ``results.csv`` and ``summary.md`` from them, and skips
finished trials before anything is dispatched. A trial carries only strings, numbers and
small dicts (the device *spec*); every device, simulated or remote, is built inside the
worker. A trial that fails is a ``failed`` row (``run_trial`` never raises); a worker that
dies under a trial (killed, out of memory, a crashed extension) makes that trial a
``failed`` row with ``error`` "worker died: ..." and the sweep goes on. On Ray such a task
is not retried (``max_retries=0``): the failed row is the record, and re-running the
command retries it.

**Determinism.** Every trial runs under :func:`execute`, which sets torch's thread count
and the BLAS/OpenMP pools (threadpoolctl) to ``trial.threads`` (1 by default) before it
starts, in either backend; a Ray task also reserves ``num_cpus=trial.threads``. So a trial
gives the same numbers in this process, in a pool worker or on a Ray node (the rows differ
only in their timing columns, ``wall_s`` and ``train_wall_s``).

**Real devices** (``tcp://`` specs). A served device is one physical instrument, so the
trials that use it are serialised on it, by a *device gate*:

- A trial takes the gate at its **first device query** and keeps it until it ends.
  Device-query methods query from their gain calibration onwards, so they hold the device
  for the whole trial. Model-based methods never query while they train, but their
  evaluation does (``train``'s own final test/validation accuracy, then the harness's
  unseen-chip, sweep and sigma evaluations): they train in parallel with everything else and
  queue for the device only for their evaluation, which then runs as one block. Connecting
  (the ``info`` request) is not a query and is not gated; the server answers it without the
  device.
- The driver keeps at most one device-query trial of a served device in flight, so that the
  others wait in the driver's queue, not in a worker slot; model-based trials are dispatched
  freely.
- The gate: on the local backend an exclusive ``flock`` on a lock file named after the
  spec in the temp directory (so it also serialises two sweeps on one host; the OS releases
  it when a worker dies); on Ray a small actor (``num_cpus=0``) that a trial polls, and that
  the driver clears when the worker holding it dies.
- The gate is applied around ``RemoteDevice.query`` in the worker process for the duration
  of the trial (restored afterwards); a worker runs one trial at a time.

The server itself already serialises single calls; the gate serialises whole trials, so that
settings counts, timings and any slow drift of the instrument belong to one trial at a time.
For a multi-node cluster, ``--out`` should be on a filesystem every node sees (run
directories are written by the worker; the rows are also written by the driver), the package
and any ``module:factory`` device adapter must be importable on every node, and a
``tcp://`` device's token must be in ``BLACKBOX_SAT_TOKEN`` where the workers run.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import replace
from multiprocessing import get_context
from pathlib import Path
from typing import TYPE_CHECKING

from blackbox_sat.devices.contract import InvalidInput, UserError

from .run import write_json_atomic

if TYPE_CHECKING:
    from .trials import Trial

BACKENDS = ("local", "ray")
RAY_INSTALL_HINT = "pip install 'blackbox-sat[ray]'"


class BackendUnavailable(UserError, ImportError, RuntimeError):
    """A backend's optional dependency is not installed."""


# --------------------------------------------------------------------------------------
# the public entry point
# --------------------------------------------------------------------------------------
def run_trials(
    trials: Iterable[Trial],
    backend: str = "local",
    workers: int = 1,
    address: str | None = None,
    on_start: Callable[[Trial], None] | None = None,
) -> Iterator[tuple[Trial, dict]]:
    """Run ``trials`` on ``backend``; an iterator of ``(trial, row)`` in completion order.

    The backend is checked at once (an unknown name or a missing Ray raises here, before any
    trial runs); the trials run as the iterator is consumed. ``on_start(trial)`` is called as
    a trial starts on the sequential local backend (for a progress bar).
    """
    todo = list(trials)
    if backend == "local":
        if address is not None:
            raise InvalidInput(
                "--address is for the ray backend; the local backend runs on this machine"
            )
        return _run_local(todo, workers, on_start)
    if backend == "ray":
        return _run_ray(todo, workers, address, import_ray())
    raise InvalidInput(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")


def import_ray():
    """The ``ray`` module, or :class:`BackendUnavailable` saying how to install it."""
    try:
        import ray
    except ImportError as exc:
        raise BackendUnavailable(
            f"the ray backend needs Ray, an optional extra that is not installed here: {RAY_INSTALL_HINT}"
        ) from exc
    return ray


# --------------------------------------------------------------------------------------
# what runs in the worker
# --------------------------------------------------------------------------------------
def execute(trial: Trial, gate=None) -> dict:
    """Run one trial in this process with its own thread counts; the device gate around a
    ``tcp://`` trial's device queries (module docstring). Returns the row."""
    import torch
    from threadpoolctl import threadpool_limits

    from .trials import run_trial

    threads = max(int(trial.threads), 1)
    torch.set_num_threads(threads)
    with threadpool_limits(limits=threads):
        if gate is None or not uses_real_device(trial):
            return run_trial(trial)
        with _gated_device_queries(gate, owner_of(trial)):
            return run_trial(trial)


def uses_real_device(trial: Trial) -> bool:
    """Whether the trial's device is a served, physical one (``tcp://``)."""
    return isinstance(trial.device, str) and trial.device.startswith("tcp://")


def is_model_based(method: str) -> bool:
    from blackbox_sat.methods.registry import get_method

    try:
        return get_method(method).model_based
    except KeyError:  # an unknown method fails at once in the worker
        return False


def exclusive(trial: Trial) -> bool:
    """A trial that queries a served device for its whole length (kept one at a time)."""
    return uses_real_device(trial) and not is_model_based(trial.method)


def owner_of(trial: Trial) -> str:
    return f"{trial.out}::{trial.key}"


@contextlib.contextmanager
def _gated_device_queries(gate, owner: str):
    """Take ``gate`` at this process's first ``RemoteDevice.query`` and hold it to the end."""
    from blackbox_sat.devices import remote

    original = remote.RemoteDevice.query
    held: list[bool] = []

    def gated_query(self, theta, x):
        if not held:
            gate.acquire(owner)
            held.append(True)
        return original(self, theta, x)

    remote.RemoteDevice.query = gated_query  # type: ignore[method-assign]  # undone below
    try:
        yield
    finally:
        remote.RemoteDevice.query = original  # type: ignore[method-assign]
        if held:
            gate.release(owner)


class FileGate:
    """A device gate for one host: an exclusive ``flock`` on a lock file named after the
    spec. Blocking, released by the OS if the holder dies. Picklable (no open file)."""

    def __init__(self, spec: str):
        digest = hashlib.sha1(spec.encode("utf-8")).hexdigest()[:16]
        self.path = str(Path(tempfile.gettempdir()) / f"blackbox-sat-device-{digest}.lock")
        self._fd: int | None = None

    def __getstate__(self):
        return {"path": self.path, "_fd": None}

    def acquire(self, owner: str) -> None:
        import fcntl

        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.ftruncate(fd, 0)
        os.write(fd, f"{owner} pid={os.getpid()}\n".encode())
        self._fd = fd

    def release(self, owner: str) -> None:
        import fcntl

        fd, self._fd = self._fd, None
        if fd is not None:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)


class _GateActor:
    """Ray actor: who holds a served device (one holder at a time)."""

    def __init__(self):
        self.holder = None

    def try_acquire(self, owner: str) -> bool:
        if self.holder in (None, owner):
            self.holder = owner
            return True
        return False

    def release(self, owner: str) -> bool:
        if self.holder == owner:
            self.holder = None
            return True
        return False

    def current(self):
        return self.holder


class RayGate:
    """A device gate for a Ray cluster: a :class:`_GateActor` polled by the workers."""

    def __init__(self, actor, poll_s: float = 0.05, max_poll_s: float = 0.5):
        self.actor, self.poll_s, self.max_poll_s = actor, poll_s, max_poll_s

    def acquire(self, owner: str) -> None:
        import ray

        delay = self.poll_s
        while not ray.get(self.actor.try_acquire.remote(owner)):
            time.sleep(delay)
            delay = min(2 * delay, self.max_poll_s)

    def release(self, owner: str) -> None:
        import ray

        ray.get(self.actor.release.remote(owner))


# --------------------------------------------------------------------------------------
# scheduling shared by the parallel backends
# --------------------------------------------------------------------------------------
def _dispatch_order(todo: list) -> tuple[list, deque]:
    """Trials to submit at once (device-query trials of a served device first, one per
    device), and the device-query trials held back until their device's trial finishes."""
    first: list = []
    later: deque = deque()
    free: list = []
    busy: set = set()
    for t in todo:
        if exclusive(t):
            if t.device in busy:
                later.append(t)
            else:
                busy.add(t.device)
                first.append(t)
        else:
            free.append(t)
    return first + free, later


def _next_for(device: str, later: deque):
    """Remove and return the next held-back trial of ``device``, or None."""
    for i, t in enumerate(later):
        if t.device == device:
            del later[i]
            return t
    return None


def failed_row(trial: Trial, exc: BaseException) -> dict:
    """The row of a trial whose worker died (or that could not be run at all)."""
    message = " ".join(f"{type(exc).__name__}: {exc}".split())
    return {
        "method": trial.method,
        "seed": trial.seed,
        "device": trial.device,
        "task": trial.task,
        "budget": trial.budget,
        "status": "failed",
        "error": f"worker died: {message[:500]}",
    }


def _record(trial: Trial, row: dict) -> dict:
    trial.row_path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(trial.row_path, row)
    return row


# --------------------------------------------------------------------------------------
# local
# --------------------------------------------------------------------------------------
def _local_gate(todo: list):
    specs = {t.device for t in todo if uses_real_device(t)}
    return {s: FileGate(s) for s in specs}


def _run_local(todo: list, workers: int, on_start) -> Iterator[tuple[Trial, dict]]:
    gates = _local_gate(todo)
    if workers is None or workers <= 1:
        for t in todo:
            if on_start is not None:
                on_start(t)
            yield t, execute(t, gates.get(t.device))
        return
    submit_now, later = _dispatch_order(todo)
    with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
        futures = {pool.submit(execute, t, gates.get(t.device)): t for t in submit_now}
        while futures:
            done, _ = wait(futures, return_when=FIRST_COMPLETED)
            for fut in done:
                t = futures.pop(fut)
                try:
                    row = fut.result()
                except Exception as exc:
                    row = _record(t, failed_row(t, exc))
                if exclusive(t):
                    nxt = _next_for(t.device, later)
                    if nxt is not None:
                        try:
                            futures[pool.submit(execute, nxt, gates.get(nxt.device))] = nxt
                        except Exception as exc:
                            yield nxt, _record(nxt, failed_row(nxt, exc))
                yield t, row


# --------------------------------------------------------------------------------------
# ray
# --------------------------------------------------------------------------------------
def _portable(trial: Trial) -> Trial:
    """Absolute paths for ``out`` and a task file, so a worker with another cwd finds them."""
    task = trial.task
    if isinstance(task, str) and Path(task).is_file():
        task = str(Path(task).resolve())
    return replace(trial, out=str(Path(trial.out).resolve()), task=task)


def _ray_start(ray, workers: int, address: str | None) -> bool:
    """Connect to Ray unless already connected; True when this call started it."""
    if ray.is_initialized():
        return False
    if address:
        ray.init(address=address)
    else:
        paths = [os.getcwd()] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
        ray.init(
            num_cpus=workers if workers and workers > 1 else None,
            include_dashboard=False,
            runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(dict.fromkeys(paths))}},
        )
    return True


def _run_ray(todo: list, workers: int, address: str | None, ray) -> Iterator[tuple[Trial, dict]]:
    if not todo:
        return
    started = _ray_start(ray, workers, address)
    pending: dict = {}
    try:
        task = ray.remote(max_retries=0)(execute)
        specs = {t.device for t in todo if uses_real_device(t)}
        gate_actor = ray.remote(num_cpus=0)(_GateActor)
        gates = {s: RayGate(gate_actor.remote()) for s in specs}

        def submit(t):
            ref = task.options(num_cpus=max(int(t.threads), 1), name=f"trial {t.key}").remote(
                _portable(t), gates.get(t.device)
            )
            pending[ref] = t

        submit_now, later = _dispatch_order(todo)
        for t in submit_now:
            submit(t)
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                t = pending.pop(ref)
                try:
                    row = ray.get(ref)
                except Exception as exc:
                    row = failed_row(t, exc)
                    if t.device in gates:  # the dead worker may have held the device
                        gates[t.device].release(owner_of(_portable(t)))
                _record(t, row)  # on the driver too: re-runs skip it even if --out is not shared
                if exclusive(t):
                    nxt = _next_for(t.device, later)
                    if nxt is not None:
                        submit(nxt)
                yield t, row
    finally:
        for ref in pending:  # interrupted: stop what is still running
            with contextlib.suppress(Exception):
                ray.cancel(ref, force=True)
        if started:
            ray.shutdown()

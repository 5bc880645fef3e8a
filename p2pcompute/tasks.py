"""Many tasks over many workers: ``client.map``, ``client.map_batch`` and their sync forms.

::

    async with client.map(job, inputs, max_price="0.01") as results:
        async for result in results:          # in input order (ordered=False: as they finish)
            print(result.index, result.outputs[0], result.worker)

Each task is ``job`` with one item of ``inputs`` as its input tensors (:meth:`Job.with_inputs`), run and verified
exactly as one ``client.run`` (the verification scheduler of ``core.scheduler``). What this runner adds: tasks go
out only while there is room (``core.cluster.Capacity``: never more in flight on a worker than its advert offers;
the rest wait in the client), ``inputs`` are read lazily and at most ``window`` tasks are held at once (started
but not yet consumed: bounded memory whatever the input length), a task whose run fails is placed again
(``retries``), and a task that cannot be done raises :class:`TaskFailed` with its index and the results already
accepted but not yet yielded. Leaving the ``async with`` early cancels the rest: a task not yet accepted is never
paid. ``map_batch`` splits one batch along its first dimension into shards sized to each worker's speed
(``core.cluster.shard_sizes``) and concatenates the outputs in order.
"""

from __future__ import annotations

import concurrent.futures
import logging
import math
import time
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, field, replace
from decimal import Decimal
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Union

import trio

from p2pcompute.core.cluster import shard_sizes
from p2pcompute.core.identity import KeyPair, PeerId
from p2pcompute.errors import ConfigError, JobError, NegotiationFailed, P2PComputeError, Reason, TaskFailed

if TYPE_CHECKING:
    import torch

    from p2pcompute.client import Client, Job, RunResult

__all__ = ["BatchResult", "MapProgress", "MapRun", "map_batch", "map_job"]

log = logging.getLogger(__name__)

DEFAULT_TASK_DEADLINE_S = 120.0  # each task: no verified result within this, and it is placed again (or fails)
DEFAULT_RETRIES = 2  # a task whose run failed is run again this many times (another worker, fresh attempts)
MAX_WINDOW = 256  # tasks held at once (started, not yet consumed), whatever the market offers
INLINE_INPUT_BYTES = 1 << 20  # bigger inputs are hashed in a worker thread, off the event loop

Item = Union["torch.Tensor", Sequence["torch.Tensor"]]


@dataclass(frozen=True, slots=True)
class MapProgress:
    """Where a map is: tasks ``done`` (accepted), ``in_flight``, ``submitted`` so far of ``total`` (None: inputs of
    unknown length), ``retried`` placements, ``credits`` paid (micro-credits), distinct ``workers`` used."""

    done: int
    in_flight: int
    submitted: int
    total: int | None
    retried: int
    credits: int
    workers: int
    elapsed_s: float


MapProgressFn = Callable[[MapProgress], None]


@dataclass
class _Stats:
    done: int = 0
    started: int = 0
    retried: int = 0
    credits: int = 0
    workers: set[PeerId] = field(default_factory=set)


class MapRun:
    """One ``client.map``: an async context manager whose value is an async iterator of :class:`RunResult`."""

    def __init__(
        self,
        client: Client,
        job: Job,
        inputs: Iterable[Item] | AsyncIterable[Item],
        *,
        max_price: int | float | str | Decimal,
        deadline: float | None = None,
        task_deadline: float = DEFAULT_TASK_DEADLINE_S,
        redundancy: int | None = None,
        ordered: bool = True,
        progress: MapProgressFn | None = None,
        window: int | None = None,
        retries: int = DEFAULT_RETRIES,
    ) -> None:
        if window is not None and window < 1:
            raise ConfigError(f"window must be at least 1, got {window}")
        if retries < 0 or task_deadline <= 0 or (deadline is not None and deadline <= 0):
            raise ConfigError("retries must not be negative and deadlines must be positive")
        self.client = client
        self.job = job
        self.inputs = inputs
        self.max_price = max_price
        self.deadline_s = deadline
        self.task_deadline = task_deadline
        self.redundancy = redundancy
        self.ordered = ordered
        self.progress = progress
        self.window = window
        self.retries = retries
        self.total = len(inputs) if hasattr(inputs, "__len__") else None  # type: ignore[arg-type]
        self.stats = _Stats()
        self._began = time.monotonic()
        self._ready: dict[int, RunResult] = {}
        self._running: set[int] = set()
        self._next = 0  # ordered: the index yielded next
        self._yielded = 0
        self._exhausted = False  # every input was read
        self._failure: TaskFailed | None = None
        self._changed = trio.Event()
        self._stack: AsyncExitStack | None = None

    # -- the context manager and the iterator --------------------------------------------------------------------

    async def __aenter__(self) -> MapRun:
        from p2pcompute.client import _to_micro

        self._max_micro = _to_micro(self.max_price)
        self._stack = AsyncExitStack()
        nursery = await self._stack.enter_async_context(trio.open_nursery())
        self._nursery = nursery
        if self.deadline_s is not None:
            self._stop_at = trio.current_time() + self.deadline_s
        else:
            self._stop_at = math.inf
        nursery.start_soon(self._feed)
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None
    ) -> bool | None:
        assert self._stack is not None
        self._nursery.cancel_scope.cancel()  # whatever is still running is not needed: never paid
        # the body's own exception (TaskFailed, a break's GeneratorExit, the caller's error) goes on as it is, not
        # wrapped in the nursery's exception group: the nursery is closed as if the body had ended normally
        await self._stack.__aexit__(None, None, None)
        return None

    def __aiter__(self) -> AsyncIterator[RunResult]:
        return self

    async def __anext__(self) -> RunResult:
        while True:
            if self.ordered and self._next in self._ready:
                return self._take(self._next)
            if not self.ordered and self._ready:
                return self._take(min(self._ready))
            failure = self._failure
            # every task before the failed one was yielded first (ordered), or is ready: nothing accepted is lost
            if (
                failure is not None
                and not any(i < failure.index for i in self._running)
                and (self.ordered or not any(i < failure.index for i in self._ready))
            ):
                failure.results.update(self._ready)
                raise failure
            if self._exhausted and self._yielded == self.stats.started:
                raise StopAsyncIteration
            if trio.current_time() >= self._stop_at:
                raise TaskFailed(
                    self._next,
                    NegotiationFailed(Reason.TIMEOUT, f"the map's deadline of {self.deadline_s} s passed"),
                    self._ready,
                )
            changed = self._changed
            with trio.move_on_at(self._stop_at):
                await changed.wait()

    # -- inside ----------------------------------------------------------------------------------------------------

    def _take(self, index: int) -> RunResult:
        result = self._ready.pop(index)
        self._yielded += 1
        if self.ordered:
            self._next += 1
        self._signal()
        return result

    def _signal(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def _report(self) -> None:
        if self.progress is not None:
            s = self.stats
            self.progress(
                MapProgress(
                    done=s.done,
                    in_flight=s.started - s.done - (1 if self._failure is not None else 0),
                    submitted=s.started,
                    total=self.total,
                    retried=s.retried,
                    credits=s.credits,
                    workers=len(s.workers),
                    elapsed_s=time.monotonic() - self._began,
                )
            )

    def _held(self) -> int:
        """Tasks started and not yet consumed: what the window bounds."""
        return self.stats.started - self._yielded

    def _window(self) -> int:
        """How many tasks may be held at once: ``window`` when given, else twice the room the eligible workers
        offer this client (so each worker has its next task ready), at least 2, at most ``MAX_WINDOW``."""
        if self.window is not None:
            return self.window
        client = self.client
        room = sum(client.capacity.limit(c) for c in client.candidates(self.job, self._max_micro))
        return max(2, min(MAX_WINDOW, 2 * room))

    async def _feed(self) -> None:
        index = 0
        async for item in _items(self.inputs):
            while self._held() >= self._window() and self._failure is None:
                changed = self._changed
                with trio.move_on_after(1.0):  # the market may grow: the window is re-read now and then
                    await changed.wait()
            if self._failure is not None:
                return
            try:
                task = await self._task_job(index, item)
            except P2PComputeError as exc:
                self._fail(index, exc)
                return
            self.stats.started += 1
            self._running.add(index)  # now, not when the task first runs: a failure found meanwhile waits for it
            self._nursery.start_soon(self._run, index, task)
            self._report()
            index += 1
        self._exhausted = True
        self._signal()

    async def _task_job(self, index: int, item: Item) -> Job:
        import torch

        tensors = [item] if isinstance(item, torch.Tensor) else list(item)
        if not all(isinstance(t, torch.Tensor) for t in tensors):
            raise JobError(Reason.BAD_ARGUMENT, f"input {index} is not a tensor or a sequence of tensors")
        if sum(t.numel() * t.element_size() for t in tensors) <= INLINE_INPUT_BYTES:
            return self.job.with_inputs(tensors)
        return await trio.to_thread.run_sync(self.job.with_inputs, tensors)

    async def _run(self, index: int, task: Job) -> None:
        try:
            await self._place(index, task)
        finally:
            self._running.discard(index)
            self._signal()

    async def _place(self, index: int, task: Job) -> None:
        client = self.client
        tries = 0
        while True:
            left = self._stop_at - trio.current_time()
            try:
                result = await client.run(
                    task,
                    max_price=self.max_price,
                    deadline=max(0.001, min(self.task_deadline, left)),
                    redundancy=self.redundancy,
                )
            except P2PComputeError as exc:
                tries += 1
                if tries > self.retries or self._stop_at - trio.current_time() <= 0:
                    self._fail(index, exc)
                    return
                log.info("task %d: %s; placing it again (%d of %d)", index, exc, tries, self.retries)
                self.stats.retried += 1
                self._report()
                continue
            s = self.stats
            s.done += 1
            s.credits += result.price
            s.workers.update(result.agreeing)
            self._ready[index] = replace(result, index=index)
            self._report()
            self._signal()
            return

    def _fail(self, index: int, error: P2PComputeError) -> None:
        if self._failure is None or index < self._failure.index:
            self._failure = TaskFailed(index, error)
        self._signal()


async def _items(inputs: Iterable[Item] | AsyncIterable[Item]) -> AsyncIterator[Item]:
    if isinstance(inputs, AsyncIterable):
        async for item in inputs:
            yield item
    else:
        for item in inputs:
            yield item


# -- one batch, sharded --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BatchResult:
    """``map_batch``'s answer: the outputs of the whole batch (concatenated along the first dimension, in order) and
    each shard's verified result (``rows``: its size; ``results[i].worker``: where it ran)."""

    outputs: list[torch.Tensor]
    results: tuple[RunResult, ...]
    rows: tuple[int, ...]

    @property
    def price(self) -> int:
        return sum(r.price for r in self.results)


async def map_batch(
    client: Client,
    job: Job,
    batch: torch.Tensor | Sequence[torch.Tensor],
    *,
    max_price: int | float | str | Decimal,
    deadline: float = DEFAULT_TASK_DEADLINE_S,
    redundancy: int | None = None,
    workers: int | None = None,
    granule: int = 1,
    progress: MapProgressFn | None = None,
) -> BatchResult:
    """Run ``job`` over a batch bigger than its example: every input is split along its first dimension into one
    shard per worker with room (at most ``workers``), sized to the worker's speed (its advert's TFLOPS, capped by
    what this client measured it to deliver: ``core.throughput``) in multiples of ``granule`` rows, so that all
    shards finish at about the same time; each shard is its own job (``job`` exported again for its size: ``job``
    must come from :meth:`Job.from_module`), run and verified as ``client.run``, tried first on the worker it was
    sized for. Returns the outputs concatenated in order: equal to running the whole batch locally (exactly, or
    within the job's tolerance). Raises :class:`TaskFailed` with the index of a shard that could not be done."""
    import torch

    tensors = [batch] if isinstance(batch, torch.Tensor) else list(batch)
    if not tensors or any(t.dim() == 0 for t in tensors):
        raise JobError(Reason.SHAPE_MISMATCH, "every batch input needs a first (batch) dimension")
    rows = tensors[0].shape[0]
    if any(t.shape[0] != rows for t in tensors):
        raise JobError(Reason.SHAPE_MISMATCH, "every batch input needs the same number of rows")
    if rows < 1:
        raise JobError(Reason.SHAPE_MISMATCH, "the batch is empty")
    from p2pcompute.client import _to_micro

    micro = _to_micro(max_price)
    if not client.candidates(job, micro):
        await client.wait_until(lambda: bool(client.candidates(job, micro)), 10.0)
    chosen = _fastest(client, client.with_room(client.candidates(job, micro)) or client.candidates(job, micro))
    if workers is not None:
        chosen = chosen[: max(1, workers)]
    if not chosen:
        from p2pcompute.errors import NoWorkersError

        raise NoWorkersError(Reason.NO_WORKERS, f"no eligible worker for job {job.digest.hex()[:16]}")
    speeds = [speed for _, speed in chosen]
    sizes = [n for n in shard_sizes(rows, speeds, granule) if n > 0]
    peers = [peer for (peer, _), n in zip(chosen, shard_sizes(rows, speeds, granule), strict=True) if n > 0]
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    shard_jobs: dict[int, Job] = {}
    for n in sorted(set(sizes)):
        shard_jobs[n] = await trio.to_thread.run_sync(job.for_batch, n)
    results: dict[int, RunResult] = {}
    stats = _Stats()
    began = time.monotonic()

    async def shard(i: int) -> None:
        part = [t[starts[i] : starts[i] + sizes[i]] for t in tensors]
        task = await trio.to_thread.run_sync(shard_jobs[sizes[i]].with_inputs, part)
        tries = 0
        while True:
            try:
                result = await client.run(
                    task, max_price=max_price, deadline=deadline, redundancy=redundancy, prefer=peers[i]
                )
                break
            except P2PComputeError as exc:
                tries += 1
                if tries > DEFAULT_RETRIES:
                    raise TaskFailed(i, exc, dict(results)) from exc
                stats.retried += 1
        results[i] = replace(result, index=i)
        stats.done += 1
        stats.credits += result.price
        stats.workers.update(result.agreeing)
        if progress is not None:
            progress(
                MapProgress(
                    done=stats.done,
                    in_flight=len(sizes) - stats.done,
                    submitted=len(sizes),
                    total=len(sizes),
                    retried=stats.retried,
                    credits=stats.credits,
                    workers=len(stats.workers),
                    elapsed_s=time.monotonic() - began,
                )
            )

    try:
        async with trio.open_nursery() as nursery:
            for i in range(len(sizes)):
                nursery.start_soon(shard, i)
    except BaseExceptionGroup as group:
        failed = group.subgroup(lambda e: isinstance(e, TaskFailed))
        if failed is not None:
            first = min((e for e in _leaves(failed) if isinstance(e, TaskFailed)), key=lambda e: e.index)
            first.results.update(results)
            raise first from None
        raise
    ordered = [results[i] for i in range(len(sizes))]
    count = len(ordered[0].outputs)
    outputs = [torch.cat([r.outputs[k] for r in ordered], dim=0) for k in range(count)]
    return BatchResult(outputs=outputs, results=tuple(ordered), rows=tuple(sizes))


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    out: list[BaseException] = []
    for e in group.exceptions:
        out.extend(_leaves(e) if isinstance(e, BaseExceptionGroup) else [e])
    return out


def _fastest(client: Client, candidates: Sequence[Any]) -> list[tuple[PeerId, float]]:
    """Each distinct worker with its speed (TFLOPS as advertised, capped by what this client measured), fastest
    first."""
    seen: dict[PeerId, float] = {}
    for c in candidates:
        speed = client.throughput.effective_tflops(c.peer, c.device.tflops)
        seen[c.peer] = max(speed, 1e-6)
    return sorted(seen.items(), key=lambda item: (-item[1], str(item[0])))


# -- sync forms ------------------------------------------------------------------------------------------------------


def map_job(
    job: Job,
    inputs: Iterable[Item],
    *,
    bootstrap: Sequence[str],
    max_price: int | float | str | Decimal,
    deadline: float | None = None,
    redundancy: int | None = None,
    key: KeyPair | Path | None = None,
    data_dir: Path | None = None,
    progress: MapProgressFn | None = None,
) -> list[RunResult]:
    """``client.map`` without async code (scripts, notebooks): opens a client, runs every task, returns the results
    in input order. Like :func:`p2pcompute.client.run_job`, the event loop runs in its own thread."""
    from p2pcompute.client import open_client

    async def main() -> list[RunResult]:
        async with (
            open_client(bootstrap, key=key, data_dir=data_dir, wait_for_market_s=5.0) as client,
            client.map(
                job, inputs, max_price=max_price, deadline=deadline, redundancy=redundancy, progress=progress
            ) as results,
        ):
            return [result async for result in results]

    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(trio.run, main).result()

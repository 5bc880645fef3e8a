"""Many tasks from one file: reading a task file (``p2pcompute submit JOB --inputs FILE``), running it through
``client.map`` with a summary, and writing each task's outputs (``--save-outputs DIR``). ``testnet --map`` prints
the same summary.

**Task files.** A job takes K input tensors (``job export`` prints them: input k has dtype D_k and shape S_k). A file
holds the inputs of N tasks, in one of these layouts:

``.safetensors`` (written with ``safetensors.torch.save_file``)
    One tensor per job input, named by the input's position: ``"0"``, ``"1"``, ... (``"input0"`` and ``"input_0"``
    are read too; a one-input job takes any one name). Each holds that input of every task, either
    *stacked*, shape ``[N, *S_k]`` (task i reads ``t[i]``), or as *rows*, shape ``[N * S_k[0], *S_k[1:]]`` (task i
    reads rows ``i * S_k[0]`` up to ``(i + 1) * S_k[0]``: a big batch cut into the job's batch size).
``.pt`` / ``.pth`` (written with ``torch.save``; read with ``torch.load(weights_only=True)``: tensors and plain
containers only, never code)
    * a list (or tuple) of N tasks, each a tensor (a one-input job) or a list/tuple of K tensors in input order;
    * a dict of named tensors, read as a safetensors file;
    * one tensor (a one-input job), stacked or as rows, as above.

Every task must match the job's inputs exactly (dtype and shape) and every input must hold the same number of tasks;
a file that does not is refused before any work with one :class:`JobError` (``shape_mismatch``, or ``bad_argument``
for a file that is not one of these layouts) naming the input and what differs.

**Outputs** (``--save-outputs DIR``): ``DIR/task-<index>.safetensors`` per task (the index zero-padded to 6 digits),
its outputs named ``"0"``, ``"1"``, ... in the job's output order (``safetensors.torch.load_file`` reads it back), and
``DIR/summary.json``: the map's summary and, per task, its worker, price and output digest.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any

from p2pcompute.errors import JobError, Reason, TaskFailed

if TYPE_CHECKING:
    import torch

    from p2pcompute.client import Client, Job, RunResult
    from p2pcompute.core.tensors import TensorMeta
    from p2pcompute.tasks import MapProgress

__all__ = [
    "INPUT_SUFFIXES",
    "MapSummary",
    "TaskInputs",
    "read_task_inputs",
    "result_line",
    "run_map",
    "save_task_outputs",
    "write_summary",
]

log = logging.getLogger(__name__)

INPUT_SUFFIXES = (".safetensors", ".pt", ".pth")
OUTPUT_NAME = "task-{index:06d}.safetensors"
SUMMARY_FILE = "summary.json"


# -- reading --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TaskInputs:
    """The tasks of a file: ``len()`` tasks; item ``i`` is task i's input tensors, in the job's input order (views of
    what was read: nothing is copied). ``layout`` says how the file was read."""

    columns: tuple[torch.Tensor, ...] = ()  # stacked: one tensor per input, first dimension = task
    items: tuple[tuple[torch.Tensor, ...], ...] = ()  # a list of tasks
    count: int = 0
    layout: str = ""

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> tuple[torch.Tensor, ...]:
        if not 0 <= index < self.count:
            raise IndexError(index)
        if self.items:
            return self.items[index]
        return tuple(column[index] for column in self.columns)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        return (self[i] for i in range(self.count))


def read_task_inputs(path: Path, job: Job) -> TaskInputs:
    """Read and check a task file for ``job`` (layouts in the module docstring). Raises :class:`JobError`."""
    suffix = path.suffix.lower()
    if suffix not in INPUT_SUFFIXES:
        raise JobError(
            Reason.BAD_ARGUMENT, f"{path}: a task file ends in {', '.join(INPUT_SUFFIXES)}, not {suffix or 'nothing'}"
        )
    if not path.is_file():
        raise JobError(Reason.BAD_ARGUMENT, f"{path}: no such file")
    metas = job.spec.inputs
    if suffix == ".safetensors":
        return _from_named(path, _load_safetensors(path), metas)
    value = _load_torch(path)
    import torch

    if isinstance(value, dict):
        return _from_named(path, value, metas)
    if isinstance(value, torch.Tensor):
        if len(metas) != 1:
            raise JobError(
                Reason.SHAPE_MISMATCH,
                f"{path}: one tensor, but the job takes {len(metas)} inputs: save a list of tasks or a dict "
                '{"0": ..., "1": ...}',
            )
        column, how = _column(path, "the tensor", value, metas[0])
        return TaskInputs(columns=(column,), count=column.shape[0], layout=f"one tensor ({how})")
    if isinstance(value, (list, tuple)):
        return _from_list(path, value, metas)
    raise JobError(
        Reason.BAD_ARGUMENT,
        f"{path}: holds a {type(value).__name__}; expected a list of tasks, a dict of named tensors or a tensor",
    )


def _load_torch(path: Path) -> Any:
    import pickle

    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, ValueError, EOFError, OSError) as exc:
        raise JobError(
            Reason.BAD_ARGUMENT,
            f"{path}: torch.load(weights_only=True) refused it (tensors and plain containers only, never code): "
            f"{_why(exc)}",
        ) from exc


def _why(exc: BaseException) -> str:
    """The useful part of torch.load's error, on one line (not its advice to load without weights_only)."""
    text = str(exc)
    marker = "WeightsUnpickler error:"
    if marker in text:
        rest = " ".join(text.split(marker, 1)[1].split())
        rest = rest.split(" Please use ")[0].split(" Check the documentation")[0].strip()
        if rest:
            return rest
    return (text.strip().splitlines() or [type(exc).__name__])[0]


def _load_safetensors(path: Path) -> dict[str, Any]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return dict(load_file(str(path), device="cpu"))
    except (SafetensorError, OSError, ValueError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise JobError(Reason.BAD_ARGUMENT, f"{path}: not a safetensors file: {first}") from exc


def _name_of(name: str, count: int) -> int | None:
    """The input position a tensor's name stands for, or None."""
    for prefix in ("input_", "input", ""):
        rest = name[len(prefix) :] if name.startswith(prefix) else None
        if rest is not None and rest.isdigit() and int(rest) < count and str(int(rest)) == rest:
            return int(rest)
    return None


def _from_named(path: Path, named: dict[Any, Any], metas: Sequence[TensorMeta]) -> TaskInputs:
    import torch

    if not named:
        raise JobError(Reason.SHAPE_MISMATCH, f"{path}: holds no tensors; the job takes {len(metas)} input(s)")
    bad = [k for k, v in named.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise JobError(Reason.BAD_ARGUMENT, f"{path}: {bad[0]!r} is not a name of a tensor")
    by_position: dict[int, tuple[str, torch.Tensor]] = {}
    if len(metas) == 1 and len(named) == 1:
        (name, tensor), *_ = named.items()
        by_position[0] = (name, tensor)
    else:
        for name, tensor in named.items():
            position = _name_of(name, len(metas))
            if position is None:
                raise JobError(
                    Reason.SHAPE_MISMATCH,
                    f"{path}: tensor {name!r} names no input of the job (it takes {len(metas)}: "
                    f"name them {_names(len(metas))})",
                )
            if position in by_position:
                raise JobError(
                    Reason.SHAPE_MISMATCH,
                    f"{path}: {by_position[position][0]!r} and {name!r} both name input {position}",
                )
            by_position[position] = (name, tensor)
    missing = [i for i in range(len(metas)) if i not in by_position]
    if missing:
        raise JobError(
            Reason.SHAPE_MISMATCH,
            f"{path}: no tensor for input {missing[0]} ({_meta(metas[missing[0]])}); the job takes {len(metas)} "
            f"input(s), named {_names(len(metas))}",
        )
    columns, hows = [], []
    for i, meta in enumerate(metas):
        name, tensor = by_position[i]
        column, how = _column(path, f"input {i} ({name!r})", tensor, meta)
        columns.append(column)
        hows.append(how)
    counts = [c.shape[0] for c in columns]
    if len(set(counts)) > 1:
        raise JobError(
            Reason.SHAPE_MISMATCH,
            f"{path}: the inputs hold different numbers of tasks: "
            + ", ".join(f"input {i}: {n}" for i, n in enumerate(counts)),
        )
    return TaskInputs(columns=tuple(columns), count=counts[0], layout=f"named tensors ({', '.join(sorted(set(hows)))})")


def _column(path: Path, what: str, tensor: torch.Tensor, meta: TensorMeta) -> tuple[torch.Tensor, str]:
    """``tensor`` as one input of every task, first dimension = task: stacked as it is, or rows cut to the job's
    batch size."""
    dtype = _dtype_name(tensor)
    if dtype != meta.dtype:
        raise JobError(Reason.SHAPE_MISMATCH, f"{path}: {what} is {dtype}, the job takes {meta.dtype}")
    shape = tuple(tensor.shape)
    want = tuple(meta.shape)
    if len(shape) == len(want) + 1 and shape[1:] == want:
        if shape[0] < 1:
            raise JobError(Reason.SHAPE_MISMATCH, f"{path}: {what} holds no tasks ({dtype}{list(shape)})")
        return tensor, "stacked"
    if want and len(shape) == len(want) and shape[1:] == want[1:] and want[0] > 0:
        rows = want[0]
        if shape[0] < 1 or shape[0] % rows:
            raise JobError(
                Reason.SHAPE_MISMATCH,
                f"{path}: {what} has {shape[0]} rows, not a multiple of the job's batch of {rows} "
                f"({dtype}{list(shape)}; the job takes {_meta(meta)})",
            )
        return tensor.reshape(shape[0] // rows, *want), "rows"
    forms = _dims(("N", *want)) + (f" or {_dims((f'N*{want[0]}', *want[1:]))}" if want else "")
    raise JobError(
        Reason.SHAPE_MISMATCH,
        f"{path}: {what} is {dtype}{list(shape)}; the job takes {_meta(meta)}: expected {forms} for N tasks",
    )


def _from_list(path: Path, value: Sequence[Any], metas: Sequence[TensorMeta]) -> TaskInputs:
    import torch

    if not value:
        raise JobError(Reason.SHAPE_MISMATCH, f"{path}: the list holds no tasks")
    items = []
    for index, item in enumerate(value):
        tensors = (item,) if isinstance(item, torch.Tensor) else item
        if not isinstance(tensors, (list, tuple)) or not all(isinstance(t, torch.Tensor) for t in tensors):
            raise JobError(
                Reason.BAD_ARGUMENT,
                f"{path}: task {index} is a {type(item).__name__}; each task is a tensor or a list of tensors",
            )
        if len(tensors) != len(metas):
            raise JobError(
                Reason.SHAPE_MISMATCH, f"{path}: task {index} has {len(tensors)} tensor(s), the job takes {len(metas)}"
            )
        for k, (tensor, meta) in enumerate(zip(tensors, metas, strict=True)):
            dtype = _dtype_name(tensor)
            if (dtype, tuple(tensor.shape)) != (meta.dtype, tuple(meta.shape)):
                raise JobError(
                    Reason.SHAPE_MISMATCH,
                    f"{path}: task {index} input {k} is {dtype}{list(tensor.shape)}, the job takes {_meta(meta)}",
                )
        items.append(tuple(tensors))
    return TaskInputs(items=tuple(items), count=len(items), layout="a list of tasks")


def _dtype_name(tensor: torch.Tensor) -> str:
    from p2pcompute.compute.interpreter import NAME_BY_DTYPE

    return NAME_BY_DTYPE.get(tensor.dtype, str(tensor.dtype).removeprefix("torch."))


def _meta(meta: TensorMeta) -> str:
    return f"{meta.dtype}{list(meta.shape)}"


def _dims(dims: Sequence[object]) -> str:
    return "[" + ", ".join(str(d) for d in dims) + "]"


def _names(count: int) -> str:
    return ", ".join(f'"{i}"' for i in range(min(count, 4))) + (", ..." if count > 4 else "")


# -- writing --------------------------------------------------------------------------------------------------------


def save_task_outputs(directory: Path, result: RunResult) -> Path:
    """Write ``result``'s outputs to ``directory/task-<index>.safetensors`` (named "0", "1", ...); returns the path."""
    from safetensors.torch import save_file

    path = directory / OUTPUT_NAME.format(index=result.index)
    save_file({str(i): t.detach().cpu().contiguous() for i, t in enumerate(result.outputs)}, str(path))
    return path


# -- running, with a summary -----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MapSummary:
    """How a map went: ``tasks`` in the input, ``done`` (verified and paid), ``failed`` (the map stops at the first
    task it cannot do: ``failed_index``, ``error``), ``retried`` placements, distinct ``workers`` whose results were
    accepted, ``credits`` paid (micro-credits), ``wall_s`` from the first task submitted to the last result."""

    tasks: int
    done: int
    failed: int
    retried: int
    workers: int
    credits: int
    wall_s: float
    failed_index: int | None = None
    error: str = ""

    @property
    def throughput(self) -> float:
        """Tasks done per second of wall time."""
        return self.done / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def ok(self) -> bool:
        return self.failed == 0 and self.done == self.tasks

    def lines(self) -> list[str]:
        credits = Decimal(self.credits) / 1_000_000
        per_task = f" ({Decimal(self.credits // self.done) / 1_000_000} per task)" if self.done else ""
        lines = [
            f"tasks:      {self.done} done of {self.tasks}, {self.failed} failed, {self.retried} placed again",
            f"workers:    {self.workers} used",
            f"credits:    {credits} paid{per_task}",
            f"wall time:  {self.wall_s:.2f} s",
            f"throughput: {self.throughput:.2f} tasks/s",
        ]
        if self.failed_index is not None:
            lines.append(f"failed:     task {self.failed_index}: {self.error}")
        return lines

    def to_json(self) -> dict[str, Any]:
        return {
            "tasks": self.tasks,
            "done": self.done,
            "failed": self.failed,
            "retried": self.retried,
            "workers": self.workers,
            "credits": str(Decimal(self.credits) / 1_000_000),
            "credits_micro": self.credits,
            "wall_seconds": round(self.wall_s, 3),
            "tasks_per_second": round(self.throughput, 3),
            "failed_index": self.failed_index,
            "error": self.error or None,
        }


@dataclass
class _Tally:
    done: int = 0
    credits: int = 0
    retried: int = 0
    workers: set[str] = field(default_factory=set)


async def run_map(
    client: Client,
    job: Job,
    inputs: Sequence[Sequence[torch.Tensor]] | TaskInputs,
    *,
    max_price: int | float | str | Decimal,
    task_deadline: float,
    redundancy: int | None = None,
    progress: Callable[[MapProgress], None] | None = None,
    on_result: Callable[[RunResult], None] | None = None,
) -> MapSummary:
    """Run ``job`` once per task of ``inputs`` through ``client.map`` (in input order); ``on_result`` sees every
    accepted result (also those accepted before a failure stopped the map). A task that cannot be done ends the map:
    the summary says which and why (nothing is raised for it)."""
    tally = _Tally()

    def seen(event: MapProgress) -> None:
        tally.retried = event.retried
        if progress is not None:
            progress(event)

    def take(result: RunResult) -> None:
        tally.done += 1
        tally.credits += result.price
        tally.workers.update(str(p) for p in result.agreeing)
        if on_result is not None:
            on_result(result)

    total = len(inputs)
    began = time.monotonic()
    failure: TaskFailed | None = None
    try:
        async with client.map(
            job, inputs, max_price=max_price, task_deadline=task_deadline, redundancy=redundancy, progress=seen
        ) as results:
            async for result in results:
                take(result)
    except TaskFailed as exc:
        failure = exc
        for index in sorted(exc.results):
            take(exc.results[index])
    wall = time.monotonic() - began
    error = ""
    if failure is not None:
        cause = failure.cause
        error = f"{cause.detail or cause.reason.value} [{cause.reason.value}]"
    return MapSummary(
        tasks=total,
        done=tally.done,
        failed=0 if failure is None else 1,
        retried=tally.retried,
        workers=len(tally.workers),
        credits=tally.credits,
        wall_s=wall,
        failed_index=None if failure is None else failure.index,
        error=" ".join(error.split()),
    )


def write_summary(directory: Path, summary: MapSummary, results: Sequence[dict[str, Any]]) -> Path:
    """``directory/summary.json``: the map's summary and a line per task (index, worker, price, output digest)."""
    path = directory / SUMMARY_FILE
    path.write_text(json.dumps({**summary.to_json(), "results": list(results)}, indent=2))
    return path


def result_line(result: RunResult) -> dict[str, Any]:
    """What ``summary.json`` keeps of one task."""
    return {
        "index": result.index,
        "worker": str(result.worker),
        "agreeing": [str(p) for p in result.agreeing],
        "price_micro_credits": result.price,
        "output_digest": result.output_digest.hex(),
        "file": OUTPUT_NAME.format(index=result.index),
    }

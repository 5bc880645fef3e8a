"""Data-parallel training over workers: each step's shards run as verified jobs, the client averages the gradients.

::

    job = Job.from_train_step(model, F.cross_entropy, shards[0])   # inputs: parameters, then (x, y)
    async with open_client(bootstrap) as client:
        result = await train(client, job, parameters_of(model), shards, steps=20, lr=0.1, max_price="0.01")
    load_parameters(model, result.params)

A step job (:meth:`Job.from_train_step`) takes the model's trainable parameters, then one shard's tensors, and
returns the loss and the gradient of each parameter. Each step, :func:`train` runs it once per shard through
``client.map`` (:meth:`Job.with_inputs`: the same graph with the current parameters and that shard; every task
verified and paid as ``client.run`` does), averages the shards' losses and gradients weighted by their batch sizes,
and takes a plain SGD step ``p <- p - lr * g`` at the client. Parameters and data travel as the job's input
tensors, named by content hash. :func:`train_locally` runs the same steps with the same job in this process
(``Job.run_locally``: the interpreter a worker uses), the reference a network run is compared with.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Union

import trio

from p2pcompute.errors import JobError, Reason

if TYPE_CHECKING:
    import torch
    from torch import nn

    from p2pcompute.client import Client, Job, RunResult
    from p2pcompute.core.identity import KeyPair, PeerId

__all__ = ["StepFn", "TrainResult", "load_parameters", "parameters_of", "train", "train_locally", "train_sync"]

Shard = Sequence["torch.Tensor"]
Shards = Sequence[Shard] | Callable[[int], Sequence[Shard]]
"""The shards of every step (full-batch descent on a fixed data set), or a function of the step giving its shards."""
StepJobs = Union["Job", Callable[[Shard], "Job"]]
"""One step job for shards of its input shapes, or a function giving the step job for a shard (called once per
distinct shard shape, e.g. ``lambda shard: Job.from_train_step(model, loss_fn, shard)`` for a smaller last shard)."""
StepFn = Callable[[int, float], None]
"""Called after each step with the step's index and loss."""


@dataclass(frozen=True)
class TrainResult:
    """What training did: the loss of each step (at the parameters the step started from: the batch-weighted mean of
    its shards' losses), the final parameters, the credits paid (micro-credits) and the workers whose results were
    accepted."""

    losses: tuple[float, ...]
    params: tuple[torch.Tensor, ...]
    price: int = 0
    workers: frozenset[PeerId] = frozenset()


def parameters_of(model: nn.Module) -> list[torch.Tensor]:
    """Copies of ``model``'s trainable parameters in the order a step job takes them (``named_parameters()``,
    ``requires_grad`` only)."""
    return [param.detach().clone() for param in model.parameters() if param.requires_grad]


def load_parameters(model: nn.Module, params: Sequence[torch.Tensor]) -> None:
    """Copy ``params`` (in :func:`parameters_of` order) into ``model``'s trainable parameters."""
    import torch

    trainable = [param for param in model.parameters() if param.requires_grad]
    if len(trainable) != len(params):
        raise JobError(Reason.SHAPE_MISMATCH, f"the model has {len(trainable)} trainable parameters, got {len(params)}")
    with torch.no_grad():
        for param, value in zip(trainable, params, strict=True):
            param.copy_(value)


class _Steps:
    """What :func:`train` and :func:`train_locally` share: shards, step jobs and the update."""

    def __init__(self, step_job: StepJobs, params: Sequence[torch.Tensor], shards: Shards, lr: float) -> None:
        import torch

        if not params or not all(isinstance(p, torch.Tensor) and p.is_floating_point() for p in params):
            raise JobError(Reason.BAD_ARGUMENT, "params must be floating tensors (parameters_of(model))")
        if not lr > 0:
            raise JobError(Reason.BAD_ARGUMENT, f"the learning rate must be > 0, got {lr}")
        self.step_job = step_job
        self.params = [p.detach().clone() for p in params]
        self.shards = shards
        self.lr = lr
        self.jobs: dict[tuple[tuple[str, tuple[int, ...]], ...], Job] = {}

    def shards_of(self, step: int) -> list[tuple[torch.Tensor, ...]]:
        shards = self.shards(step) if callable(self.shards) else self.shards
        out = [tuple(shard) for shard in shards]
        if not out or any(not shard or shard[0].dim() == 0 for shard in out):
            raise JobError(Reason.BAD_ARGUMENT, f"step {step}: shards must be tensors with a batch dimension")
        return out

    def job_for(self, shard: Shard) -> Job:
        """The step job for ``shard``'s shapes, checked against the parameters once."""
        key = tuple((str(t.dtype), tuple(t.shape)) for t in shard)
        job = self.jobs.get(key)
        if job is None:
            job = self.step_job(shard) if callable(self.step_job) else self.step_job
            self._check(job, len(shard))
            self.jobs[key] = job
        return job

    def _check(self, job: Job, shard_tensors: int) -> None:
        from p2pcompute.compute.interpreter import NAME_BY_DTYPE

        n = len(self.params)
        spec = job.spec
        if len(spec.inputs) != n + shard_tensors or len(job.outputs) != n + 1:
            raise JobError(
                Reason.SHAPE_MISMATCH,
                f"the step job takes {len(spec.inputs)} inputs and returns {len(job.outputs)} outputs; "
                f"{n} parameters and shards of {shard_tensors} tensors need {n + shard_tensors} and {n + 1}",
            )
        for i, param in enumerate(self.params):
            want = (NAME_BY_DTYPE.get(param.dtype), tuple(param.shape))
            if (spec.inputs[i].dtype, spec.inputs[i].shape) != want or job.outputs[i + 1] != want:
                raise JobError(Reason.SHAPE_MISMATCH, f"parameter {i} {want} is not the step job's input {i}")
        if job.outputs[0][1] != ():
            raise JobError(Reason.SHAPE_MISMATCH, "the step job's first output (the loss) is not a scalar")

    def update(self, shards: Sequence[Shard], outputs: Sequence[Sequence[torch.Tensor]]) -> float:
        """Average the shards' losses and gradients, weighted by batch size, and take the SGD step; the loss."""
        import torch

        weights = [int(shard[0].shape[0]) for shard in shards]
        total = sum(weights)
        loss = sum(w * float(out[0]) for w, out in zip(weights, outputs, strict=True)) / total
        for i, param in enumerate(self.params):
            grad = sum(
                (w * out[i + 1].to(torch.float64) for w, out in zip(weights, outputs, strict=True)),
                torch.zeros(param.shape, dtype=torch.float64),
            )
            self.params[i] = param - self.lr * (grad / total).to(param.dtype)
        return loss


async def train(
    client: Client,
    step_job: StepJobs,
    params: Sequence[torch.Tensor],
    shards: Shards,
    *,
    steps: int,
    lr: float,
    max_price: int | float | str | Decimal,
    deadline: float | None = None,
    redundancy: int | None = None,
    progress: StepFn | None = None,
) -> TrainResult:
    """Train for ``steps`` steps of data-parallel SGD, each shard of each step one verified task on the network.

    ``step_job`` is a :meth:`Job.from_train_step` job (or a function of a shard giving one, see :data:`StepJobs`);
    ``params`` the starting parameters in its input order (:func:`parameters_of`); ``shards`` each step's shards,
    tuples of tensors in the job's input order after the parameters. A step runs the job on every shard with the
    current parameters (``client.map``; ``max_price`` per task, ``deadline`` bounds each step's map,
    ``redundancy`` as in ``client.run``), then averages the results: shard ``i`` of ``n_i`` rows (its first
    tensor's first dimension) weighs ``n_i / sum(n)`` in the loss and in each gradient, so with a mean-reduced loss
    the step's gradient is the gradient of the whole step's batch. The parameters are then updated at the client,
    ``p <- p - lr * g``. Raises what ``client.map`` raises (``TaskFailed``), and :class:`JobError` when the shards
    or parameters do not fit the job.
    """
    state = _Steps(step_job, params, shards, lr)
    losses: list[float] = []
    accepted: list[RunResult] = []
    for step in range(steps):
        step_shards = state.shards_of(step)
        outputs = await _run_step(client, state, step_shards, accepted, max_price, deadline, redundancy)
        losses.append(state.update(step_shards, outputs))
        if progress is not None:
            progress(step, losses[-1])
    return TrainResult(
        losses=tuple(losses),
        params=tuple(state.params),
        price=sum(r.price for r in accepted),
        workers=frozenset(peer for r in accepted for peer in r.agreeing),
    )


async def _run_step(
    client: Client,
    state: _Steps,
    shards: Sequence[tuple[torch.Tensor, ...]],
    accepted: list[RunResult],
    max_price: int | float | str | Decimal,
    deadline: float | None,
    redundancy: int | None,
) -> list[Sequence[torch.Tensor]]:
    """One step's tasks: one ``client.map`` per step job (one unless the shards differ in shape), all at once."""
    groups: dict[int, tuple[Job, list[int]]] = {}
    for i, shard in enumerate(shards):
        job = state.job_for(shard)
        groups.setdefault(id(job), (job, []))[1].append(i)
    outputs: dict[int, Sequence[torch.Tensor]] = {}

    async def run_group(job: Job, indices: list[int]) -> None:
        items = [(*state.params, *shards[i]) for i in indices]
        async with client.map(job, items, max_price=max_price, deadline=deadline, redundancy=redundancy) as results:
            async for result in results:
                outputs[indices[result.index]] = result.outputs
                accepted.append(result)

    async with trio.open_nursery() as nursery:
        for job, indices in groups.values():
            nursery.start_soon(run_group, job, indices)
    return [outputs[i] for i in range(len(shards))]


def train_locally(
    step_job: StepJobs,
    params: Sequence[torch.Tensor],
    shards: Shards,
    *,
    steps: int,
    lr: float,
    progress: StepFn | None = None,
) -> TrainResult:
    """The steps of :func:`train` in this process: the same jobs on the same shards through ``Job.run_locally`` (the
    interpreter a worker runs), the same weighted average and update. The reference for a network run."""
    state = _Steps(step_job, params, shards, lr)
    losses: list[float] = []
    for step in range(steps):
        step_shards = state.shards_of(step)
        outputs = [state.job_for(shard).with_inputs([*state.params, *shard]).run_locally() for shard in step_shards]
        losses.append(state.update(step_shards, outputs))
        if progress is not None:
            progress(step, losses[-1])
    return TrainResult(losses=tuple(losses), params=tuple(state.params))


def train_sync(
    step_job: StepJobs,
    params: Sequence[torch.Tensor],
    shards: Shards,
    *,
    bootstrap: Sequence[str],
    steps: int,
    lr: float,
    max_price: int | float | str | Decimal,
    deadline: float | None = None,
    redundancy: int | None = None,
    key: KeyPair | Path | None = None,
    data_dir: Path | None = None,
    progress: StepFn | None = None,
    wait_for_market_s: float = 5.0,
) -> TrainResult:
    """:func:`train` without async code (scripts, notebooks): opens a client through ``bootstrap``, trains, closes
    it. Like ``run_job``, the event loop runs in its own thread."""
    from p2pcompute.client import open_client

    async def main() -> TrainResult:
        async with open_client(bootstrap, key=key, data_dir=data_dir, wait_for_market_s=wait_for_market_s) as client:
            return await train(
                client,
                step_job,
                params,
                shards,
                steps=steps,
                lr=lr,
                max_price=max_price,
                deadline=deadline,
                redundancy=redundancy,
                progress=progress,
            )

    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(trio.run, main).result()

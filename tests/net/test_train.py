"""Data-parallel training over real workers: ``testnet/examples/train_mlp.py`` on two workers on loopback gives the
loss curve and the parameters of ``train_locally`` on the same shards.

Each step's shards are verified tasks (``client.map``) on real py-libp2p workers with real sandboxed executors; the
gradients are averaged and the parameters updated at the client.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest
import torch
import trio

from p2pcompute.testing.jobs import client_of, cluster
from p2pcompute.train import parameters_of

MAX_PRICE = 1_000_000
TEST_TIMEOUT_S = 240.0
STEPS = 4
EXAMPLE = Path(__file__).resolve().parents[2] / "testnet" / "examples" / "train_mlp.py"


def example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("train_mlp_example", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


async def test_the_mlp_example_trained_over_workers_follows_the_local_loss_curve(tmp_path: Path) -> None:
    train_mlp = example()
    with trio.fail_after(TEST_TIMEOUT_S):
        async with cluster(tmp_path, 2) as workers, client_of(workers, tmp_path / "client", wait_for=2) as client:
            remote, local = await train_mlp.run(client, steps=STEPS, lr=0.5, max_price=MAX_PRICE)
    assert len(remote.losses) == STEPS
    assert remote.losses == pytest.approx(local.losses, rel=train_mlp.RTOL, abs=1e-6)
    assert train_mlp.agree(remote, local)
    assert remote.losses[-1] < remote.losses[0]  # it learns
    assert remote.price > 0 and remote.workers and remote.workers <= {w.peer for w in workers}
    # the parameters moved from the model's, by the same steps as locally
    model, _ = train_mlp.model_and_shards()
    start = parameters_of(model)
    assert all(not torch.equal(a, b) for a, b in zip(remote.params, start, strict=True))

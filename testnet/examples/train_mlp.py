"""Train a small MLP on a synthetic data set over the network: data-parallel SGD, one verified task per shard.

::

    p2pcompute node run ...   # workers of a testnet; each prints its multiaddr
    .venv/bin/python testnet/examples/train_mlp.py --bootstrap /ip4/127.0.0.1/tcp/4001/p2p/12D3KooW... [--steps 10]

The step job (``Job.from_train_step``: forward and backward in one graph; inputs the parameters, then a shard) is
exported once; each step runs it on every shard with the current parameters through ``client.map``, the client
averages the gradients (weighted by shard size) and updates the weights. The same steps run locally with the same
job on the same shards (``train_locally``); the script prints both loss curves and exits 1 if they differ by more
than the tolerance. ``tests/net/test_train.py`` runs :func:`run` on in-process workers.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import torch
import torch.nn.functional as F
import trio
from torch import nn

from p2pcompute.client import Client, Job, open_client
from p2pcompute.train import TrainResult, parameters_of, train, train_locally

IN_FEATURES, HIDDEN, CLASSES = 16, 32, 4
SHARDS, ROWS = 4, 32
RTOL = 1e-4


def model_and_shards(seed: int = 0) -> tuple[nn.Module, list[tuple[torch.Tensor, torch.Tensor]]]:
    """The MLP (fixed initial weights) and the data set in shards: Gaussian points labelled by the arg-max of a fixed
    random linear map, so a small MLP can learn them."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(SHARDS * ROWS, IN_FEATURES, generator=generator)
    y = (x @ torch.randn(IN_FEATURES, CLASSES, generator=generator)).argmax(dim=1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(IN_FEATURES, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, CLASSES))
    return model, [(x[i * ROWS : (i + 1) * ROWS], y[i * ROWS : (i + 1) * ROWS]) for i in range(SHARDS)]


async def run(
    client: Client, *, steps: int, lr: float, max_price: int | float | str, progress: bool = False
) -> tuple[TrainResult, TrainResult]:
    """Train over the network, then the same steps locally; both results."""
    model, shards = model_and_shards()
    job = Job.from_train_step(model, F.cross_entropy, shards[0])
    params = parameters_of(model)

    def show(step: int, loss: float) -> None:
        if progress:
            print(f"  step {step:3d}  loss {loss:.6f}", flush=True)

    remote = await train(client, job, params, shards, steps=steps, lr=lr, max_price=max_price, progress=show)
    local = train_locally(job, params, shards, steps=steps, lr=lr)
    return remote, local


def agree(remote: TrainResult, local: TrainResult, rtol: float = RTOL) -> bool:
    """The loss curves and final parameters agree within ``rtol``."""
    losses = all(abs(a - b) <= rtol * abs(b) + 1e-6 for a, b in zip(remote.losses, local.losses, strict=True))
    return losses and all(
        torch.allclose(a, b, rtol=rtol, atol=1e-6) for a, b in zip(remote.params, local.params, strict=True)
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bootstrap", action="append", required=True, help="a peer's multiaddr (repeatable)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--lr", type=float, default=0.5)
    parser.add_argument("--max-price", default="0.01", help="credits per task")
    args = parser.parse_args(argv)

    async def go() -> tuple[TrainResult, TrainResult]:
        async with open_client(args.bootstrap, wait_for_market_s=10.0) as client:
            return await run(client, steps=args.steps, lr=args.lr, max_price=args.max_price, progress=True)

    remote, local = trio.run(go)
    print(f"{'step':>4}  {'network':>10}  {'local':>10}")
    for step, (a, b) in enumerate(zip(remote.losses, local.losses, strict=True)):
        print(f"{step:4d}  {a:10.6f}  {b:10.6f}")
    print(f"paid {remote.price / 1_000_000} credits to {len(remote.workers)} workers")
    ok = agree(remote, local)
    print("the network's loss curve equals local training" if ok else "MISMATCH with local training")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

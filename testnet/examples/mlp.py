"""A small MLP to run on the network: the example of ``p2pcompute job export``.

::

    p2pcompute job export testnet/examples/mlp.py:model --out mlp.job
    p2pcompute submit mlp.job --bootstrap /ip4/127.0.0.1/tcp/4001/p2p/12D3KooW...

``job export`` imports this file and looks up ``model`` (an ``nn.Module`` instance; a subclass such as ``MLP``,
instantiated with no arguments, or a plain function of tensors such as ``affine`` work too) and ``example_inputs``
(a tuple of tensors, or a function returning one): the job computes ``model(*example_inputs)``.
"""

from __future__ import annotations

import torch
from torch import nn

IN_FEATURES, HIDDEN, OUT_FEATURES, BATCH = 64, 128, 10, 32


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(IN_FEATURES, HIDDEN),
            nn.ReLU(),
            nn.Linear(HIDDEN, HIDDEN),
            nn.ReLU(),
            nn.Linear(HIDDEN, OUT_FEATURES),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.layers(x), dim=-1)


def affine(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """A function of tensors works as well: ``--inputs affine_inputs``."""
    return torch.relu(x @ w + 1.0)


def example_inputs() -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(1)
    return (torch.randn(BATCH, IN_FEATURES, generator=generator),)


def affine_inputs() -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(2)
    return (torch.randn(BATCH, IN_FEATURES, generator=generator), torch.randn(IN_FEATURES, 16, generator=generator))


with torch.random.fork_rng(devices=[]):
    torch.manual_seed(0)  # fixed weights: the same bundle (and digest) on every export
    model = MLP().eval()

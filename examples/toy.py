"""A small real regression problem: a deterministic synthetic data set and an MLP.

Used by the demo, the benchmarks and the tests, so that splice and the torchrun baseline
train exactly the same job. The targets come from a fixed random "teacher" network plus
noise, so the loss falls steadily and loss curves can be compared between runs.
"""

from __future__ import annotations

import torch
from torch import nn


class TeacherDataset(torch.utils.data.Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """`num_samples` inputs with targets from a fixed random teacher network."""

    def __init__(self, num_samples: int = 4096, dim: int = 32, seed: int = 1234) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(num_samples, dim, generator=g)
        teacher = nn.Sequential(nn.Linear(dim, 64), nn.Tanh(), nn.Linear(64, 1))
        with torch.no_grad():
            for p in teacher.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            y = teacher(self.x)
            y = (y - y.mean()) / y.std()  # unit variance: a loss of ~1 means "learned nothing"
            self.y = y + 0.05 * torch.randn(num_samples, 1, generator=g)

    def __len__(self) -> int:
        return self.x.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[index], self.y[index]


def make_mlp(dim: int = 32, hidden: int = 256, depth: int = 3, seed: int = 0) -> nn.Module:
    """An MLP with dropout (so the per-micro-batch RNG matters), identical for a given seed."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    width = dim
    for _ in range(depth):
        layers += [nn.Linear(width, hidden), nn.ReLU(), nn.Dropout(0.1)]
        width = hidden
    layers.append(nn.Linear(width, 1))
    return nn.Sequential(*layers)


def mse_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Mean squared error over the micro-batch (splice weights it by the batch's size)."""
    x, y = batch
    return nn.functional.mse_loss(model(x), y)

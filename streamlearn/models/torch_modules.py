"""The compact models as PyTorch modules: the canonical definition.

``CompactMLP(shape)`` has exactly the parameter names and shapes of
:class:`streamlearn.models.ModelShape.layout`, so a checkpoint written by either
engine loads into the other: ``module.load_state_dict(safetensors.torch.load(blob))``.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from streamlearn.models import ModelShape


class CompactMLP(nn.Module):
    """Linear layers with ReLU or tanh between them (no hidden layer: a linear model)."""

    def __init__(self, shape: ModelShape) -> None:
        super().__init__()
        self.shape = shape
        sizes = shape.sizes
        self.layers = nn.ModuleList(nn.Linear(sizes[i], sizes[i + 1]) for i in range(len(sizes) - 1))
        self._act = torch.relu if shape.activation == "relu" else torch.tanh

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < last:
                x = self._act(x)
        return x


def to_torch(shape: ModelShape, state: dict[str, np.ndarray]) -> CompactMLP:
    """A torch module holding a copy of ``state`` (numpy arrays under torch names)."""
    module = CompactMLP(shape)
    module.load_state_dict({k: torch.from_numpy(np.array(v, dtype=np.float32)) for k, v in state.items()})
    return module


def from_torch(module: nn.Module) -> dict[str, np.ndarray]:
    """The module's parameters as numpy arrays (copies)."""
    return {k: v.detach().cpu().numpy().copy() for k, v in module.state_dict().items()}

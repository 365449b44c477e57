"""Hidden layers other than Linear + activation for the VAE's encoder and decoder (`--layer`, training/vae.py's
mlp): both are plain torch ops (Linear, add, sigmoid, mul), so the ONNX graphs keep their inputs and outputs."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class ResidualLinear(nn.Module):
    """h + act(Linear(h)): a skip connection around one hidden layer of unchanged width (the identity path
    lets a deeper stack start near a shallower one)."""

    def __init__(self, width: int, act: nn.Module):
        super().__init__()
        self.linear, self.act = nn.Linear(width, width), act

    def forward(self, h: Tensor) -> Tensor:
        return h + self.act(self.linear(h))


class GatedLinear(nn.Module):
    """act(Linear(h)) * sigmoid(Linear_g(h)): a gated linear unit (Dauphin et al., 2017), the GatedDense layer
    of Tomczak & Welling's VampPrior and Sylvester-flow code (which use no activation: `--activation none`)."""

    def __init__(self, a: int, b: int, act: nn.Module):
        super().__init__()
        self.linear, self.gate, self.act = nn.Linear(a, b), nn.Linear(a, b), act

    def forward(self, h: Tensor) -> Tensor:
        return self.act(self.linear(h)) * torch.sigmoid(self.gate(h))

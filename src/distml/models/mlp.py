"""Multi-layer perceptron classifier: flatten, Linear-ReLU-Dropout stack, Linear.

The smallest model in the zoo, used for tabular data, smoke tests and
federated-learning simulations where thousands of client copies must be cheap.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from distml.errors import ConfigError
from distml.models.registry import register_model


@dataclass
class MLPConfig:
    in_features: int = 64
    hidden: list[int] = field(default_factory=lambda: [128, 128])
    num_classes: int = 10
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.in_features < 1 or self.num_classes < 1 or any(h < 1 for h in self.hidden):
            raise ConfigError(
                "model.args in_features, hidden and num_classes must be positive sizes; "
                f"got in_features={self.in_features}, hidden={self.hidden}, "
                f"num_classes={self.num_classes}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.args.dropout must be in [0, 1), got {self.dropout}")


class MLP(nn.Module):
    """(B, ...) inputs flattened to (B, in_features) -> (B, num_classes) logits."""

    def __init__(self, cfg: MLPConfig) -> None:
        super().__init__()
        self.config = cfg
        layers: list[nn.Module] = []
        width = cfg.in_features
        for h in cfg.hidden:
            layers += [nn.Linear(width, h), nn.ReLU(), nn.Dropout(cfg.dropout)]
            width = h
        layers.append(nn.Linear(width, cfg.num_classes))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        if x.shape[1] != self.config.in_features:
            raise ValueError(
                f"MLP expects {self.config.in_features} features per sample, got {x.shape[1]}; "
                "set model.args.in_features to the flattened input size"
            )
        return self.layers(x)


@register_model("mlp", MLPConfig, "classification")
def build_mlp(cfg: MLPConfig) -> MLP:
    return MLP(cfg)

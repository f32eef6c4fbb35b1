"""The classic two-conv image classifier (the PyTorch MNIST example shape).

conv3x3-ReLU per entry of ``channels`` (no padding), max-pool 2, dropout,
flatten, fc-ReLU-dropout, fc. The flattened size is computed from
``image_size`` so the same net serves 8x8 digits, 28x28 MNIST and 32x32 CIFAR.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from distml.errors import ConfigError
from distml.models.registry import register_model


@dataclass
class CNNConfig:
    in_channels: int = 1
    image_size: int = 8
    num_classes: int = 10
    channels: list[int] = field(default_factory=lambda: [32, 64])
    hidden: int = 128
    dropout: float = 0.25

    def __post_init__(self) -> None:
        sizes = [self.in_channels, self.num_classes, self.hidden, *self.channels]
        if not self.channels or any(s < 1 for s in sizes):
            raise ConfigError(
                "model.args in_channels, num_classes, hidden and channels must be positive "
                f"(channels non-empty); got in_channels={self.in_channels}, "
                f"num_classes={self.num_classes}, hidden={self.hidden}, channels={self.channels}"
            )
        if self.pooled_size < 1:
            raise ConfigError(
                f"model.args.image_size={self.image_size} is too small for "
                f"{len(self.channels)} unpadded 3x3 convs and a 2x2 pool; use image_size >= "
                f"{2 * len(self.channels) + 2} or fewer channels entries"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.args.dropout must be in [0, 1), got {self.dropout}")

    @property
    def pooled_size(self) -> int:
        # Each unpadded 3x3 conv trims 2 pixels; the pool halves (floor).
        return (self.image_size - 2 * len(self.channels)) // 2


class CNN(nn.Module):
    """(B, in_channels, image_size, image_size) -> (B, num_classes) logits."""

    def __init__(self, cfg: CNNConfig) -> None:
        super().__init__()
        self.config = cfg
        convs: list[nn.Module] = []
        ch = cfg.in_channels
        for out in cfg.channels:
            convs += [nn.Conv2d(ch, out, kernel_size=3), nn.ReLU()]
            ch = out
        self.features = nn.Sequential(*convs, nn.MaxPool2d(2), nn.Dropout(cfg.dropout))
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(ch * cfg.pooled_size**2, cfg.hidden),
            nn.ReLU(),
            nn.Dropout(cfg.dropout),
            nn.Linear(cfg.hidden, cfg.num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c, s = self.config.in_channels, self.config.image_size
        if x.dim() != 4 or tuple(x.shape[1:]) != (c, s, s):
            raise ValueError(
                f"CNN expects input (B, {c}, {s}, {s}), got {tuple(x.shape)}; "
                "set model.args.in_channels and image_size to match the data"
            )
        return self.classifier(self.features(x))


@register_model("cnn", CNNConfig, "classification")
def build_cnn(cfg: CNNConfig) -> CNN:
    return CNN(cfg)

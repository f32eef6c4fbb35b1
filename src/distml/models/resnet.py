"""A small CIFAR-style ResNet built from BasicBlocks.

Stem conv, then stages of residual blocks (stride 2 at the start of every
stage but the first), adaptive average pool and a linear classifier. All
residual blocks sit in order in ``self.blocks`` and run in a plain loop, so
activation checkpointing can wrap single blocks and pipeline parallelism can
cut the list into stages.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from distml.errors import ConfigError
from distml.models.registry import register_model

NORMS = ("batch", "group", "none")


@dataclass
class ResNetConfig:
    in_channels: int = 3
    image_size: int = 32
    num_classes: int = 10
    widths: list[int] = field(default_factory=lambda: [16, 32, 64])
    blocks_per_stage: list[int] = field(default_factory=lambda: [1, 1, 1])
    norm: str = "batch"

    def __post_init__(self) -> None:
        if self.norm not in NORMS:
            raise ConfigError(
                f"model.args.norm must be one of {', '.join(NORMS)}, got {self.norm!r}"
            )
        if not self.widths or len(self.widths) != len(self.blocks_per_stage):
            raise ConfigError(
                "model.args.widths and blocks_per_stage must be non-empty lists of the same "
                f"length (one entry per stage); got {self.widths} and {self.blocks_per_stage}"
            )
        sizes = [self.in_channels, self.image_size, self.num_classes, *self.widths]
        if any(s < 1 for s in [*sizes, *self.blocks_per_stage]):
            raise ConfigError(
                "model.args in_channels, image_size, num_classes, widths and blocks_per_stage "
                "must all be positive"
            )


def make_norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        # Groups must divide the channel count; up to 8 groups keeps >= 2 channels
        # per group for the default widths and still works for odd widths.
        return nn.GroupNorm(math.gcd(channels, 8), channels)
    return nn.Identity()


class BasicBlock(nn.Module):
    """Two 3x3 convs with a residual; a 1x1 projection when the shape changes."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, norm: str) -> None:
        super().__init__()
        bias = norm == "none"  # a bias before a norm layer is redundant
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=bias)
        self.norm1 = make_norm(norm, out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=bias)
        self.norm2 = make_norm(norm, out_ch)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=bias), make_norm(norm, out_ch)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """(B, in_channels, H, W) -> (B, num_classes) logits; any H, W >= 1."""

    def __init__(self, cfg: ResNetConfig) -> None:
        super().__init__()
        self.config = cfg
        w0 = cfg.widths[0]
        self.stem = nn.Sequential(
            nn.Conv2d(cfg.in_channels, w0, 3, padding=1, bias=cfg.norm == "none"),
            make_norm(cfg.norm, w0),
            nn.ReLU(),
        )
        blocks: list[nn.Module] = []
        in_ch = w0
        for stage, (width, n) in enumerate(zip(cfg.widths, cfg.blocks_per_stage, strict=True)):
            for i in range(n):
                stride = 2 if stage > 0 and i == 0 else 1
                blocks.append(BasicBlock(in_ch, width, stride, cfg.norm))
                in_ch = width
        self.blocks = nn.ModuleList(blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_ch, cfg.num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        return self.fc(self.pool(x).flatten(1))


@register_model("resnet", ResNetConfig, "classification")
def build_resnet(cfg: ResNetConfig) -> ResNet:
    return ResNet(cfg)

"""Video front end: a 3D-conv stem and a per-frame 2D ResNet (PReLU), as in AV-HuBERT.

Module and parameter names (``frontend3D``, ``trunk.layerN.M.{conv1,bn1,relu1,...}``) are part of the
checkpoint contract: published checkpoints address them by these names.
"""
from typing import Sequence

import torch
from torch import nn


def _activation(kind: str, channels: int) -> nn.Module:
    if kind == "prelu":
        return nn.PReLU(num_parameters=channels)
    if kind == "relu":
        return nn.ReLU()
    raise ValueError(f"unknown resnet_relu_type {kind!r} (expected 'prelu' or 'relu')")


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection (ResNet-18/34 block)."""

    def __init__(self, in_planes: int, planes: int, stride: int, relu_type: str):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = _activation(relu_type, planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = _activation(relu_type, planes)
        self.downsample = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        y = self.relu1(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return self.relu2(y + shortcut)


class ResNetTrunk(nn.Module):
    """Four stages of BasicBlocks (64, 128, 256, 512 channels) and global average pooling.

    ``blocks_per_stage`` = [2, 2, 2, 2] is ResNet-18 (the paper's trunk). Smaller values (a stage may
    have 0 blocks) give cheap trunks for tests; the output width is then the last non-empty stage's.
    """

    stage_planes = (64, 128, 256, 512)

    def __init__(self, blocks_per_stage: Sequence[int], relu_type: str, in_planes: int = 64):
        super().__init__()
        if len(blocks_per_stage) != 4 or any(int(n) < 0 for n in blocks_per_stage):
            raise ValueError(f"resnet_layers must be 4 non-negative ints, got {list(blocks_per_stage)}")
        self.out_channels = in_planes
        for stage, (planes, n_blocks) in enumerate(zip(self.stage_planes, blocks_per_stage), start=1):
            blocks = []
            for b in range(int(n_blocks)):
                stride = 2 if (b == 0 and stage > 1) else 1
                blocks.append(BasicBlock(self.out_channels, planes, stride, relu_type))
                self.out_channels = planes
            setattr(self, f"layer{stage}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, (2.0 / fan_out) ** 0.5)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.avgpool(x).flatten(1)


class ResEncoder(nn.Module):
    """(B, 1, T, H, W) gray frames -> (B, C, T) per-frame embeddings."""

    frontend_channels = 64

    def __init__(self, relu_type: str = "prelu", blocks_per_stage: Sequence[int] = (2, 2, 2, 2),
                 weights: str = None):
        super().__init__()
        c = self.frontend_channels
        self.frontend3D = nn.Sequential(
            nn.Conv3d(1, c, kernel_size=(5, 7, 7), stride=(1, 2, 2), padding=(2, 3, 3), bias=False),
            nn.BatchNorm3d(c),
            _activation(relu_type, c),
            nn.MaxPool3d(kernel_size=(1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1)),
        )
        self.trunk = ResNetTrunk(blocks_per_stage, relu_type, in_planes=c)
        self.backend_out = self.trunk.out_channels
        if weights is not None:
            self._load_lipreading_weights(weights)

    def _load_lipreading_weights(self, path: str) -> None:
        # Optional initialisation from a lip-reading ResNet (keys under "encoder." or bare).
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("model_state_dict", state.get("model", state))
        prefix = "encoder." if any(k.startswith("encoder.") for k in state) else ""
        own = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        missing, unexpected = self.load_state_dict(own, strict=False)
        if len(own) == 0 or len(missing) == len(self.state_dict()):
            raise ValueError(f"{path}: no ResNet weights matching frontend3D/trunk names")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch = x.size(0)
        x = self.frontend3D(x)  # (B, C, T, H', W')
        n_frames = x.size(2)
        x = x.transpose(1, 2).reshape(batch * n_frames, x.size(1), x.size(3), x.size(4))
        x = self.trunk(x)  # (B*T, C)
        return x.view(batch, n_frames, -1).transpose(1, 2).contiguous()

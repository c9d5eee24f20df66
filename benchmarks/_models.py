"""Networks the benchmarks share (no torchvision on these machines)."""

from __future__ import annotations

import torch
from torch import nn

from auditor.toolkit.models import BasicBlock

__all__ = ["ResNet18"]


class ResNet18(nn.Module):
    """ResNet-18 for 32x32 inputs (He et al. 2016; the CIFAR stem used by the paper's experiments)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        stages, width = [], 64
        for out, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            stages.append(nn.Sequential(BasicBlock(width, out, stride), BasicBlock(out, out)))
            width = out
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.pool(x), 1))

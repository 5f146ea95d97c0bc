"""GoogLeNet (Inception v1) for 3x32x32 input."""

import torch
from torch import nn


def conv_bn(in_channels: int, out_channels: int, kernel: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, kernel, padding=kernel // 2, bias=False),
                         nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))  # fmt: skip


class Inception(nn.Module):
    """Four branches concatenated: 1x1; 1x1 then 3x3; 1x1 then 5x5 (as two 3x3s); 3x3 max-pool then 1x1."""

    def __init__(self, in_channels: int, c1: int, c3_reduce: int, c3: int, c5_reduce: int, c5: int, pool: int):
        super().__init__()
        self.branch1 = conv_bn(in_channels, c1, 1)
        self.branch3 = nn.Sequential(conv_bn(in_channels, c3_reduce, 1), conv_bn(c3_reduce, c3, 3))
        self.branch5 = nn.Sequential(conv_bn(in_channels, c5_reduce, 1), conv_bn(c5_reduce, c5, 3), conv_bn(c5, c5, 3))
        self.branch_pool = nn.Sequential(nn.MaxPool2d(3, stride=1, padding=1), conv_bn(in_channels, pool, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.branch1(x), self.branch3(x), self.branch5(x), self.branch_pool(x)], 1)


class GoogLeNet(nn.Module):
    """The paper's nine Inception blocks and widths (3a-b, 4a-e, 5a-b), with BatchNorm and without the auxiliary
    classifiers; a 3x3 stem and a max-pool after it, so the blocks run at 16x16, 8x8 and 4x4 (~6.2M parameters)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(conv_bn(3, 64, 3), conv_bn(64, 192, 3), nn.MaxPool2d(2))
        self.blocks = nn.Sequential(
            Inception(192, 64, 96, 128, 16, 32, 32), Inception(256, 128, 128, 192, 32, 96, 64),
            nn.MaxPool2d(2),
            Inception(480, 192, 96, 208, 16, 48, 64), Inception(512, 160, 112, 224, 24, 64, 64),
            Inception(512, 128, 128, 256, 24, 64, 64), Inception(512, 112, 144, 288, 32, 64, 64),
            Inception(528, 256, 160, 320, 32, 128, 128),
            nn.MaxPool2d(2),
            Inception(832, 256, 160, 320, 32, 128, 128), Inception(832, 384, 192, 384, 48, 128, 128),
        )  # fmt: skip
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(0.4)
        self.fc = nn.Linear(1024, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(torch.flatten(self.pool(self.blocks(self.stem(x))), 1)))

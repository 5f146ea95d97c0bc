"""VGG with BatchNorm for 3x32x32 input: configurations A (VGG-11) and D (VGG-16)."""

import torch
from torch import nn

# Output channels of each 3x3 conv; "M" a 2x2 max-pool. Five pools take 32x32 to 1x1.
CONFIGS: dict[str, list[int | str]] = {
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
}


class VGG(nn.Module):
    """3x3 conv + BatchNorm + ReLU stacks between max-pools, then one linear layer on the 512 channels left at
    1x1 (the CIFAR form: the ImageNet original's 4096-wide fully connected layers would dwarf the rest)."""

    def __init__(self, config: list[int | str], num_classes: int = 10) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for item in config:
            if item == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(channels, item, 3, padding=1, bias=False), nn.BatchNorm2d(item),
                           nn.ReLU(inplace=True)]  # fmt: skip
                channels = item
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


def vgg(name: str, num_classes: int = 10) -> VGG:
    return VGG(CONFIGS[name], num_classes)

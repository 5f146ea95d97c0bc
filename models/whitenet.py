"""WhiteNet: a small VGG-like network behind a frozen patch-whitening convolution, after the fast CIFAR-10
training of airbench94 (Jordan, "94% on CIFAR-10 in 3.29 seconds on a single GPU", arXiv 2404.00498).

A 2x2 convolution whose filters whiten the training images' patches (and their negatives), then three
groups of conv - max-pool - BatchNorm - GELU - conv - BatchNorm - GELU of widths 64, 256, 256, a global
max-pool and a linear head: about a fifth of ResNet-18's multiply-accumulates per image.
"""

import torch
from torch import nn

WIDTHS = (64, 256, 256)
PATCH = 2  # the whitening convolution's kernel side
LOGIT_SCALE = 1 / 9  # keeps the logits small at the start, when the head's inputs are large
EPSILON = 5e-4  # added to the patch covariance's eigenvalues before they divide


class BatchNorm(nn.BatchNorm2d):
    """BatchNorm whose scale stays 1 (only the shift is learned), with fast-moving running statistics."""

    def __init__(self, channels: int) -> None:
        super().__init__(channels, eps=1e-12, momentum=0.4)
        self.weight.requires_grad_(False)


class Conv(nn.Conv2d):
    """3x3 'same' convolution without bias, starting as the identity on its first input channels."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(in_channels, out_channels, 3, padding="same", bias=False)
        nn.init.dirac_(self.weight.data[:in_channels])


class ConvGroup(nn.Module):
    """conv, 2x2 max-pool, BatchNorm, GELU, conv, BatchNorm, GELU."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv1, self.pool, self.norm1 = Conv(in_channels, out_channels), nn.MaxPool2d(2), BatchNorm(out_channels)
        self.conv2, self.norm2 = Conv(out_channels, out_channels), BatchNorm(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.gelu(self.norm1(self.pool(self.conv1(x))))
        return nn.functional.gelu(self.norm2(self.conv2(x)))


class WhiteNet(nn.Module):
    """Whitening 2x2 conv (frozen once fitted) and GELU, three ConvGroups, global max-pool, linear head."""

    def __init__(self, num_classes: int = 10, widths: tuple[int, ...] = WIDTHS) -> None:
        super().__init__()
        self.whiten = nn.Conv2d(3, 2 * 3 * PATCH**2, PATCH, bias=True)
        self.whiten.weight.requires_grad_(False)
        channels, groups = self.whiten.out_channels, []
        for width in widths:
            groups.append(ConvGroup(channels, width))
            channels = width
        self.groups = nn.Sequential(*groups)
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.head = nn.Linear(channels, num_classes, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = torch.flatten(self.pool(self.groups(nn.functional.gelu(self.whiten(x)))), 1)
        return self.head(features) * LOGIT_SCALE

    @torch.no_grad()
    def fit_to(self, images: torch.Tensor) -> None:
        """Set the whitening filters from normalized float NCHW training images: the eigenvectors of their 2x2
        patches' covariance, each divided by the square root of its eigenvalue, and their negatives."""
        patches = images.float().unfold(2, PATCH, 1).unfold(3, PATCH, 1)  # N, C, H', W', PATCH, PATCH
        patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(-1, 3 * PATCH**2)
        covariance = patches.T @ patches / len(patches)
        eigenvalues, eigenvectors = torch.linalg.eigh(covariance)
        filters = (eigenvectors.T / torch.sqrt(eigenvalues + EPSILON)[:, None]).reshape(-1, 3, PATCH, PATCH)
        self.whiten.weight.copy_(torch.cat([filters, -filters]))

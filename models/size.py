"""How big a network is: parameters, and multiply-accumulates for one 32x32 image."""

import torch
from torch import nn


def parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def multiply_accumulates(model: nn.Module) -> int:
    """Multiply-accumulates of one forward pass on a 3x32x32 image, from its convolutions and linear layers."""
    total = 0

    def count(module: nn.Module, _: tuple, out: torch.Tensor) -> None:
        nonlocal total
        if isinstance(module, nn.Conv2d):
            per_output = module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
            total += out[0].numel() * per_output
        else:
            total += module.in_features * module.out_features

    hooks = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, 3, 32, 32))
    finally:
        for hook in hooks:
            hook.remove()
    return total

"""The networks (PyTorch); importing this package needs no torch."""

from core.contract import CLASS_NAMES

ARCHS: tuple[str, ...] = ("lenet", "resnet18")


def get_model(name: str, num_classes: int = len(CLASS_NAMES)):
    """Build an untrained network by architecture name."""
    if name == "lenet":
        from models.lenet import LeNet5

        return LeNet5(num_classes)
    if name == "resnet18":
        from models.resnet import resnet18

        return resnet18(num_classes)
    raise ValueError(f"unknown architecture {name!r}; choose one of: {', '.join(ARCHS)}")


__all__ = ["ARCHS", "get_model"]

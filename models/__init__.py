"""The networks (PyTorch); importing this package needs no torch."""

from core.contract import CLASS_NAMES

# The seed's networks, each sized for 32x32 CIFAR images, and WhiteNet, built to train fast.
ARCHS: tuple[str, ...] = ("lenet", "alexnet", "vgg11", "vgg16", "googlenet", "resnet18", "whitenet")


def get_model(name: str, num_classes: int = len(CLASS_NAMES)):
    """Build an untrained network by architecture name."""
    if name == "lenet":
        from models.lenet import LeNet5

        return LeNet5(num_classes)
    if name == "alexnet":
        from models.alexnet import AlexNet

        return AlexNet(num_classes)
    if name in ("vgg11", "vgg16"):
        from models.vgg import vgg

        return vgg(name, num_classes)
    if name == "googlenet":
        from models.googlenet import GoogLeNet

        return GoogLeNet(num_classes)
    if name == "resnet18":
        from models.resnet import resnet18

        return resnet18(num_classes)
    if name == "whitenet":
        from models.whitenet import WhiteNet

        return WhiteNet(num_classes)
    raise ValueError(f"unknown architecture {name!r}; choose one of: {', '.join(ARCHS)}")


__all__ = ["ARCHS", "get_model"]

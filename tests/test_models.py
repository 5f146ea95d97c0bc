import pytest
import torch

from models import ARCHS, CLASS_NAMES, get_model


@pytest.mark.parametrize(("arch", "parameters"), [("lenet", 62_006), ("resnet18", 11_173_962)])
def test_parameter_counts(arch: str, parameters: int) -> None:
    assert sum(p.numel() for p in get_model(arch).parameters()) == parameters


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("n", [1, 7])
def test_output_shape(arch: str, n: int) -> None:
    model = get_model(arch).eval()
    with torch.no_grad():
        assert model(torch.randn(n, 3, 32, 32)).shape == (n, len(CLASS_NAMES))


def test_unknown_architecture_names_the_choices() -> None:
    with pytest.raises(ValueError, match="lenet, resnet18"):
        get_model("vgg")

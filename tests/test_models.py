import pytest
import torch

from models import ARCHS, CLASS_NAMES, get_model
from models.size import multiply_accumulates
from models.size import parameters as count_parameters


@pytest.mark.parametrize(
    ("arch", "parameters"),
    [
        ("lenet", 62_006),
        ("alexnet", 7_506_762),
        ("vgg11", 9_228_362),
        ("vgg16", 14_724_042),
        ("googlenet", 6_265_610),
        ("resnet18", 11_173_962),
    ],
)
def test_parameter_counts(arch: str, parameters: int) -> None:
    assert count_parameters(get_model(arch)) == parameters


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("n", [1, 7])
def test_output_shape(arch: str, n: int) -> None:
    model = get_model(arch).eval()
    with torch.no_grad():
        assert model(torch.randn(n, 3, 32, 32)).shape == (n, len(CLASS_NAMES))


def test_unknown_architecture_names_the_choices() -> None:
    with pytest.raises(ValueError, match="choose one of: lenet, alexnet, vgg11, vgg16, googlenet, resnet18"):
        get_model("vgg")


def test_multiply_accumulates_count_convolutions_and_linear_layers() -> None:
    # LeNet-5: conv 3->6 5x5 at 28x28, conv 6->16 5x5 at 10x10, then 400x120, 120x84, 84x10
    assert multiply_accumulates(get_model("lenet")) == 28 * 28 * 6 * 75 + 10 * 10 * 16 * 150 + 48_000 + 10_080 + 840

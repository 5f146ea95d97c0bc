"""The input contract shared by training, export and serving (torch-free)."""

CLASS_NAMES: tuple[str, ...] = (
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
)
INPUT_SIZE = 32
# ImageNet statistics: the service reads them back from the ONNX metadata.
MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

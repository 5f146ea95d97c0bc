"""Torch-free code shared by training, serving and the CLI: the input contract, preprocessing,
ONNX Runtime, the model store and the errors a user can fix."""

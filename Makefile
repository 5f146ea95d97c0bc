# Set-up and everyday commands; each target installs what it needs into .venv.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PORT ?= 3000
IMAGE_GPU ?= cifar10-classifier:gpu
IMAGE_CPU ?= cifar10-classifier:cpu

.PHONY: serve test lint grpc-stubs bento image image-cpu k8s-validate bench soak register-shipped clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# The serving set only (no torch); rebuilt when pyproject.toml changes.
$(VENV)/.serve: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e .
	touch $@

# Everything: training extra (torch from pip), Ray for predict --ray, and test tools.
$(VENV)/.all: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[train,ray,dev]'
	touch $@ $(VENV)/.serve

register-shipped: $(VENV)/.serve
	$(BIN)/python -m core.store

serve: register-shipped
	@$(BIN)/python -m tools.port $(PORT)
	$(BIN)/bentoml serve service.service:Classifier --port $(PORT)

test: $(VENV)/.all
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports
	$(BIN)/python -m pytest

# The gRPC messages from service/grpc/inference.proto (committed; run again after changing it).
grpc-stubs: $(VENV)/.all
	$(BIN)/python -m grpc_tools.protoc -I . --python_out=. service/grpc/inference.proto

lint: $(VENV)/.all
	$(BIN)/ruff check .
	$(BIN)/lint-imports
	$(BIN)/ruff format --check .

# The last line printed is the plain tag (BentoML prints it as __tag__:NAME:VERSION).
bento: register-shipped
	@$(BIN)/python -m service.plan
	$(BIN)/bentoml build --output tag > $(VENV)/.bento-tag
	@sed 's/^__tag__://' $(VENV)/.bento-tag

# Container images, with docker or else podman; each prints its tag and size last.
# GPU: onnxruntime-gpu with CUDA 13 + cuDNN 9 from pip (runs on CPU hosts too). CPU: no CUDA libraries.
image: register-shipped
	bash deploy/container/build.sh gpu $(IMAGE_GPU)

image-cpu: register-shipped
	bash deploy/container/build.sh cpu $(IMAGE_CPU)

# Renders every Kubernetes overlay and validates it (also part of make test).
k8s-validate: $(VENV)/.all
	$(BIN)/python -m pytest -q tests/test_kubernetes.py

bench: $(VENV)/.all
	$(BIN)/python -m bench.run

# 10 minutes at 70% of capacity with 10% bad input and one SIGTERM-restart: bench/soak/soak.{csv,png}
soak: $(VENV)/.all
	$(BIN)/python -m bench.soak

clean:
	rm -rf $(VENV) build *.egg-info

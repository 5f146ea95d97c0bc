"""Training checkpoints: read one safely, rebuild its network, run it in PyTorch eval mode."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from core.errors import UserError
from models import get_model


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Read a training checkpoint with weights_only=True; a clear error for anything else."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch.load fails in many ways (pickle, zip, index errors) on a damaged file
        raise UserError(
            f"{path} is not a readable training checkpoint ({type(exc).__name__}); "
            "pass RUN_DIR/best.pt or last.pt from `cifar10 train`"
        ) from None
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise UserError(f"{path} is not a checkpoint written by `cifar10 train` (no model/config entries)")
    return state


def model_from_checkpoint(state: dict) -> torch.nn.Module:
    model = get_model(state["config"]["arch"])
    model.load_state_dict(state["model"])
    return model.eval()


def torch_logits(model: torch.nn.Module, batch: np.ndarray) -> np.ndarray:
    """Eval-mode PyTorch logits for a normalized float32 NCHW batch."""
    with torch.no_grad():
        return model(torch.from_numpy(batch)).numpy()

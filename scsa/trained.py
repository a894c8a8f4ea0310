"""A trained model back from a train.py checkpoint (loaded weights-only): weights, run config, class names.

What scoring, exporting and attention maps all start from, so each of them reads a
checkpoint the same way.
"""
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List

import torch
import torch.nn as nn

from scsa.errors import UserError
from scsa.models import create_model_from_config


@dataclass
class TrainedModel:
    model: nn.Module          # eval mode, on the CPU, with the chosen weights loaded
    config: Dict[str, Any]    # the run's resolved config (model, attention, data, ...)
    classes: List[str]        # label order of the training data
    checkpoint: Dict[str, Any]


def load_checkpoint(path: str) -> Dict[str, Any]:
    """Load with ``weights_only=True``: tensors and plain containers only, never code."""
    if not Path(path).is_file():
        raise UserError(f"checkpoint '{path}' not found: pass the path of a .pt file written by train.py")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise UserError(f"checkpoint '{path}' holds objects that are not plain weights and was refused "
                        f"({first_line(e)}): only load checkpoints you trust") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as e:
        raise UserError(f"checkpoint '{path}' is empty, truncated or corrupt ({first_line(e)}): "
                        f"use another checkpoint, e.g. best.pt, or retrain") from None


def first_line(e: BaseException) -> str:
    """The start of an exception's message for a one-line error (its type where the message is empty)."""
    lines = str(e).strip().splitlines()
    return lines[0][:120] if lines else type(e).__name__


def load_trained(path: str, ema: bool = False, kernel: str = "auto") -> TrainedModel:
    """The model of checkpoint ``path``: its weights, or with ``ema`` the model EMA's.

    ``kernel`` replaces the attention kernel the run trained with: where a model runs is
    the caller's choice, not the checkpoint's.
    """
    checkpoint = load_checkpoint(path)
    if "config" not in checkpoint or "model" not in checkpoint:
        raise UserError(f"'{path}' is not a train.py checkpoint (no model/config): "
                        f"pass checkpoints/last.pt or best.pt from a run dir")
    if ema and "model_ema" not in checkpoint:
        raise UserError(f"'{path}' holds no EMA weights: train with trainer.model_ema=true, or drop ema=true")
    config = checkpoint["config"]
    model = create_model_from_config(config["model"], config["attention"], len(checkpoint["classes"]), kernel)
    try:
        model.load_state_dict(checkpoint["model_ema" if ema else "model"])
    except RuntimeError as e:
        raise UserError(f"'{path}' holds weights that do not fit its own config (model={config['model']['name']} "
                        f"attention={config['attention']['name']}: {first_line(e)}): the file was altered or "
                        f"mixed up; use another checkpoint") from None
    return TrainedModel(model.eval(), config, list(checkpoint["classes"]), checkpoint)

"""Training checkpoints without pickle: model and optimizer tensors in safetensors, the rest JSON.

A checkpoint directory appears whole or not at all (built beside, then swapped into place), and
its three files carry one random id, checked on load, so parts of two checkpoints never mix.
"""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vitrim.errors import ModelFileError
from vitrim.fsutil import atomic_dir, write_json
from vitrim.io import load_state, load_weights_into, read_json_file, save_state

STATE_FILE = "trainer.json"
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimizer state dict into flat tensors and JSON-able rest."""
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, slots in state["state"].items():
        for key, value in slots.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{key}"] = value
            else:
                scalars[f"{index}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor],
                      rest: dict[str, Any]) -> None:
    slots: dict[int, dict[str, Any]] = {}
    for flat, value in list(tensors.items()) + list(rest["scalars"].items()):
        index, key = flat.split(".", 1)
        slots.setdefault(int(index), {})[key] = value
    optimizer.load_state_dict({"state": slots, "param_groups": rest["param_groups"]})


def save_checkpoint(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                    state: dict[str, Any]) -> None:
    """Model, optimizer and trainer state as one unit: the previous checkpoint stays until the new
    one is complete."""
    tensors, rest = optimizer_tensors(optimizer)
    checkpoint_id = secrets.token_hex(8)
    with atomic_dir(directory) as tmp:
        save_state(tmp / MODEL_FILE, model.state_dict(), metadata={"checkpoint_id": checkpoint_id})
        save_state(tmp / OPTIMIZER_FILE, tensors, metadata={"checkpoint_id": checkpoint_id})
        write_json(tmp / STATE_FILE, {**state, "checkpoint_id": checkpoint_id, "optimizer": rest})


def file_checkpoint_id(path: Path) -> str | None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as handle:
            return (handle.metadata() or {}).get("checkpoint_id")
    except Exception:  # unreadable files are reported by load_state with the fix
        return None


def check_parts(directory: Path, state: dict[str, Any]) -> None:
    """Refuse a checkpoint whose weight files and trainer state come from different saves."""
    expected = state.get("checkpoint_id")
    parts = {name: file_checkpoint_id(directory / name) for name in (MODEL_FILE, OPTIMIZER_FILE)}
    if expected is None and not any(parts.values()):
        return  # written before checkpoints carried an id
    mixed = [name for name, found in parts.items() if found != expected]
    if mixed:
        raise ModelFileError(f"checkpoint {directory} is inconsistent: {', '.join(mixed)} and {STATE_FILE} "
                             f"come from different saves; delete {directory} and start without --resume")


def load_checkpoint(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    state = read_json_file(directory / STATE_FILE, f"no checkpoint in {directory} (missing {STATE_FILE})",
                           "start without --resume")
    check_parts(directory, state)
    load_weights_into(model, load_state(directory / MODEL_FILE), directory / MODEL_FILE)
    restore_optimizer(optimizer, load_state(directory / OPTIMIZER_FILE), state.pop("optimizer"))
    state.pop("checkpoint_id", None)
    return state

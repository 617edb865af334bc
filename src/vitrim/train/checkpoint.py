"""Training checkpoints without pickle: model and optimizer tensors in safetensors, the rest JSON."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from vitrim.fsutil import write_json
from vitrim.io import load_state, load_weights_into, read_json_file, save_state

STATE_FILE = "trainer.json"


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
    """Weights and optimizer first, the JSON that names them last (so a crash leaves the old one)."""
    tensors, rest = optimizer_tensors(optimizer)
    save_state(directory / "model.safetensors", model.state_dict())
    save_state(directory / "optimizer.safetensors", tensors)
    write_json(directory / STATE_FILE, {**state, "optimizer": rest})


def load_checkpoint(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    state = read_json_file(directory / STATE_FILE, f"no checkpoint in {directory} (missing {STATE_FILE})",
                           "start without --resume")
    load_weights_into(model, load_state(directory / "model.safetensors"), directory / "model.safetensors")
    restore_optimizer(optimizer, load_state(directory / "optimizer.safetensors"), state.pop("optimizer"))
    return state

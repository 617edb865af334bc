"""Peak memory of one forward pass, from the PyTorch profiler's allocation timeline."""

from __future__ import annotations

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from vitrim.bench.latency import example_input


def peak_activation_bytes(model: nn.Module, batch_size: int = 1) -> int | None:
    """Peak bytes allocated during a forward pass beyond the weights and input (None if unknown).

    On CUDA: ``torch.cuda.max_memory_allocated`` over the pass, minus what was allocated before."""
    from vitrim.bench.latency import runner_device

    device = runner_device(model)
    x = example_input(model, batch_size).to(device)
    model.eval()
    if device.type == "cuda":
        with torch.inference_mode():
            torch.cuda.synchronize(device)
            before = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            model(x)
            torch.cuda.synchronize(device)
            return int(torch.cuda.max_memory_allocated(device) - before)
    if device.type != "cpu":
        return None
    try:
        with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU], profile_memory=True,
                                             record_shapes=True, with_stack=True) as prof:
            model(x)
        timeline = prof._memory_profile().timeline
    except Exception:  # the timeline is a private profiler API; measurement is best effort
        return None
    live = peak = 0
    sizes: dict[object, int] = {}
    for _, action, key, size in timeline:
        name = getattr(action, "name", str(action))
        if name == "CREATE":
            sizes[key] = size
            live += size
        elif name == "DESTROY" and key in sizes:
            live -= sizes.pop(key)
        elif name == "INCREMENT_VERSION":
            continue
        peak = max(peak, live)
    return peak

"""``vitrim prune`` as one library call: prune a model in its own family, compare the dense and
pruned models (accuracy, params, FLOPs, latency timed interleaved by each family's own forward),
and save the pruned model with its report."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vitrim.adapters import family_of, to_canonical
from vitrim.adapters.native import native
from vitrim.bench.any_model import compare_models
from vitrim.io import save
from vitrim.prune import PruneConfig, prune
from vitrim.prune.report import dimension_plan, write_report

REPORT_BATCHES = (1, 64)


def prune_and_save(original: nn.Module, cfg: PruneConfig, train_set: Any, test_set: Any, out: str | Path, *,
                   name: str, weights: str = "trained", command: str = "", threads: int | None = None,
                   runs: int = 30, progress: bool = True, log: Callable[[str], None] | None = None,
                   device: str | torch.device | None = None) -> tuple[dict[str, Any], nn.Module]:
    """Prune ``original`` (any family) to ``cfg``, measure it against the dense model, save it to ``out``.

    ``test_set=None`` reports no accuracy (random calibration data, ``--no-eval``). The directory
    gets the pruned model in ``original``'s family, plus ``report/`` (JSON, Markdown, plan plot);
    ``out`` should already be locked by the caller (``locked=True`` saving). Returns the report and
    the pruned model's canonical equivalent.

    ``device``: where pruning, evaluation and timing run (the saved weights are the same). Under
    ``torchrun`` every rank prunes (to the same plan and weights) and evaluates its shard; rank 0
    alone times and saves, the others wait at a barrier and return a report without latency.
    """
    from vitrim import distributed

    family = family_of(original) or "vitrim"
    model = to_canonical(original)
    result = prune(original, config=cfg, data=train_set, train_data=train_set, progress=progress, log=log,
                   device=device)
    pruned_family = result.model
    pruned = to_canonical(pruned_family)
    report: dict[str, Any] = {"model": name, "family": family, "weights": weights,
                              "calibration": train_set.name, "metric": result.metric,
                              "kept_ratio": result.kept_ratio, "config": result.config.to_dict(), "steps": result.steps}
    runners = {"dense": native(original), "pruned": native(pruned_family)}  # the family's own forward
    measured = compare_models(runners, REPORT_BATCHES, test=test_set, image_size=model.config.image_size,
                              threads=threads, runs=runs, progress=progress and distributed.is_main(), device=device)
    for key, net in (("dense", model), ("pruned", pruned)):
        entry = measured[key]
        entry["dimension_plan"] = dimension_plan(net.config)
        entry["embed_dim"] = net.config.embed_dim
        report[key] = entry
    report["command"] = command
    if distributed.is_main():
        pruned_family.cpu()  # saved from the CPU; the weights are the same wherever they were computed
        save(pruned_family, out, extra={"pruning": {"command": command, "base": name, "config": result.config.to_dict(),
                                                    "kept_ratio": result.kept_ratio}},
             add_files=lambda tmp: write_report(tmp / "report", report, model.config, pruned.config), locked=True)
    distributed.barrier()
    return report, pruned

"""Dimension pruning: saliency, cost, budgeted search, surgery and recovery."""

from vitrim.prune.api import PruneConfig, PruneResult, parse_target, prune
from vitrim.prune.plan import BlockPlan, PrunePlan
from vitrim.prune.saliency import saliency
from vitrim.prune.search import STRUCTURES, Search
from vitrim.prune.surgery import slice_model

__all__ = ["BlockPlan", "PruneConfig", "PrunePlan", "PruneResult", "STRUCTURES", "Search", "parse_target",
           "prune", "saliency", "slice_model"]

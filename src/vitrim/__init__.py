"""vitrim: make trained Vision Transformers smaller and faster while keeping their accuracy."""

from vitrim.prune import PruneConfig  # loads the vitrim.prune package before the name is bound to vitrim.api.prune
from vitrim.api import create, load, prune, save
from vitrim.bench import analyze, evaluate, measure
from vitrim.device import resolve_device
from vitrim.errors import ConfigError, DataError, ModelFileError, UnknownModelError, VitrimError
from vitrim.models import BlockDims, ViTConfig, VisionTransformer
from vitrim.tokens import reduce_tokens

__version__ = "0.1.0"

__all__ = ["BlockDims", "ConfigError", "DataError", "ModelFileError", "PruneConfig", "UnknownModelError",
           "ViTConfig", "VisionTransformer", "VitrimError", "analyze", "create", "evaluate",
           "load", "measure", "prune", "reduce_tokens", "resolve_device", "save", "__version__"]

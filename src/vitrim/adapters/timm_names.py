"""timm models by name (``timm:NAME``), built by timm itself: random init unless ``pretrained``.

Pretrained weights come through timm from the Hugging Face Hub or its local cache (timm reads
safetensors there, and pickle files only with ``weights_only=True``); without network only cached
weights load, and vitrim says so instead of hanging on a missing download.
"""

from __future__ import annotations

from torch import nn

from vitrim.adapters import family_of, unsupported
from vitrim.errors import ConfigError, ModelFileError


def create_timm(name: str, pretrained: bool = False) -> nn.Module:
    """``timm.create_model(name, pretrained=pretrained)`` in eval mode, checked for vitrim."""
    try:
        import timm
    except ImportError:
        raise ConfigError("timm:NAME needs timm: pip install 'vitrim[timm]' (timm needs torchvision)") from None
    if not name.startswith("hf-hub:") and not timm.is_model(name):
        raise ConfigError(f"timm has no model {name!r}; list the ViTs with timm.list_models('vit_*') or "
                          f"timm.list_models('deit_*')")
    try:
        model = timm.create_model(name, pretrained=pretrained)
    except OSError as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ModelFileError(f"could not fetch {'pretrained weights' if pretrained else 'the model'} for "
                             f"timm:{name} ({reason}); they come from the Hugging Face Hub or its local cache. "
                             f"Offline, leave out --pretrained (pretrained=False) for random weights") from None
    except (RuntimeError, ValueError, TypeError, AssertionError) as exc:
        raise ConfigError(f"timm could not build {name!r}: {str(exc).splitlines()[0] if str(exc) else exc!r}") from None
    if family_of(model) is None:
        raise unsupported(f"timm:{name} ({type(model).__name__})")
    from vitrim.adapters.timm import check

    try:
        check(model)
    except ConfigError as exc:
        raise ConfigError(f"timm:{name}: {exc}") from None
    return model.eval()

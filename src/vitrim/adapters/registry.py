"""The family registry: every model family vitrim converts is one :class:`Family`, registered by its
own adapter module.

A family says how to recognise one of its live models, how to convert it exactly to the canonical
:class:`~vitrim.models.VisionTransformer` and back (``metadata`` is the JSON that ``from_canonical``
needs, stored by :func:`vitrim.save`), what its head is, which structures can be pruned, and —
for Hugging Face families — which ``transformers`` classes and ``model_type`` values it covers, so
that a ``save_pretrained`` directory finds its family.

Adding a family is writing one module in :mod:`vitrim.adapters.families` that calls
:func:`register` at import: the registry imports every module of that package on first use, so
no other file changes.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from vitrim.errors import ConfigError, ModelFileError

FAMILIES_PACKAGE = "vitrim.adapters.families"
ALL_PRUNABLE = ("heads", "qk", "v", "mlp", "embed", "attn_layer", "mlp_layer")
# attention with one head_dim for queries, keys and values (HF, timm): heads are pruned whole
WHOLE_HEADS = tuple(s for s in ALL_PRUNABLE if s not in ("qk", "v"))


def _no_check(meta: dict[str, Any], num_classes: int) -> None:
    return None


@dataclass(frozen=True)
class Family:
    """One model family.

    ``name`` is stored as ``"family"`` in a saved model's ``config.json``; ``summary`` is the
    phrase listed in "supported:" messages and the docs table. ``recognizes(model)`` says whether
    a live module belongs to the family; ``to_canonical`` / ``from_canonical(canonical, meta)``
    convert exactly; ``metadata(model)`` is the JSON ``from_canonical`` needs;
    ``check_metadata(meta, num_classes)`` raises a :class:`~vitrim.errors.ModelFileError` for a
    saved config that could not be rebuilt; ``head_kind(model)`` is ``"classifier"``, ``"pooler"``
    or ``"none"`` (a backbone: pruned by feature distance, without labels). ``prunable`` lists the
    gate kinds (see :mod:`vitrim.prune.gates`) the family's modules can express after slicing.
    ``hf_classes`` / ``hf_model_types``: the ``transformers`` classes and ``config.json``
    ``model_type`` values of a Hugging Face family; ``hf_config_class`` maps a class to its config
    class; ``hf_infer_class(config, weight_names)`` picks the class when ``architectures`` is absent;
    ``hf_check_config(config, source)`` type- and size-checks a ``config.json`` before transformers
    builds anything; ``hf_load_options(hf_class, weight_names)`` are extra ``from_pretrained``
    keyword arguments.

    Added fields (all optional): ``check(model)`` raises a :class:`~vitrim.errors.ConfigError`
    naming what vitrim cannot convert in a live model (run by the loaders right after building
    it); ``canonical`` marks the family whose models *are* the canonical ViT (no conversion, no
    wrapper for measuring); ``spec_prefix`` / ``load_spec(name, pretrained)`` let a family own a
    model spec ``PREFIX:NAME`` (``timm:deit_small_patch16_224``); ``order`` sorts :func:`families`
    (recognition order and the "supported:" list; ties keep import order).
    """

    name: str
    summary: str
    recognizes: Callable[[Any], bool]
    to_canonical: Callable[[nn.Module], nn.Module]
    from_canonical: Callable[[nn.Module, dict[str, Any]], nn.Module]
    metadata: Callable[[nn.Module], dict[str, Any]]
    check_metadata: Callable[[dict[str, Any], int], None] = _no_check
    head_kind: Callable[[nn.Module], str] = lambda model: "classifier"
    prunable: tuple[str, ...] = ALL_PRUNABLE
    token_reduction: str = "drop, evit, tome"
    onnx: bool = True
    hf_classes: tuple[str, ...] = ()
    hf_model_types: tuple[str, ...] = ()
    hf_config_class: Callable[[str], str] | None = None
    hf_infer_class: Callable[[dict[str, Any], list[str]], str] | None = None
    hf_check_config: Callable[[dict[str, Any], Any], None] | None = None
    hf_load_options: Callable[[str, list[str]], dict[str, Any]] = lambda hf_class, names: {}
    extra: dict[str, Any] = field(default_factory=dict)
    check: Callable[[nn.Module], None] | None = None
    canonical: bool = False
    spec_prefix: str = ""
    load_spec: Callable[[str, bool], nn.Module] | None = None
    order: int = 100


_FAMILIES: dict[str, Family] = {}
_LOADED = False


def register(family: Family) -> Family:
    """Add ``family`` to the registry (an adapter module calls this at import)."""
    if family.name in _FAMILIES and _FAMILIES[family.name] is not family:
        raise ConfigError(f"model family {family.name!r} is registered twice")
    _FAMILIES[family.name] = family
    return family


def _load_adapters() -> None:
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    package = importlib.import_module(FAMILIES_PACKAGE)
    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
        importlib.import_module(f"{FAMILIES_PACKAGE}.{info.name}")


def families() -> list[Family]:
    """Every registered family, in recognition order."""
    _load_adapters()
    return sorted(_FAMILIES.values(), key=lambda family: family.order)


def get_family(name: str) -> Family:
    """The family called ``name``; a :class:`ConfigError` listing the known names otherwise."""
    _load_adapters()
    if name not in _FAMILIES:
        raise ConfigError(f"unknown model family {name!r} (known: {', '.join(f.name for f in families())})")
    return _FAMILIES[name]


def family_of(model: Any) -> Family | None:
    """The family ``model`` belongs to, or None."""
    for family in families():
        if family.recognizes(model):
            return family
    return None


def hf_family_for(model_type: Any, hf_class: str | None = None) -> Family | None:
    """The Hugging Face family covering ``hf_class`` (when given), else ``model_type``; or None."""
    if hf_class is not None:
        return next((f for f in families() if hf_class in f.hf_classes), None)
    return next((f for f in families() if model_type in f.hf_model_types), None)


def spec_prefixes() -> dict[str, Family]:
    """``{prefix: family}`` for the families that own a ``PREFIX:NAME`` model spec."""
    return {f.spec_prefix: f for f in families() if f.spec_prefix}


MetadataKeys = dict[str, tuple[tuple[type, ...], bool]]


def check_metadata_keys(meta: dict[str, Any], keys: MetadataKeys) -> None:
    """A :class:`~vitrim.errors.ModelFileError` unless ``meta`` holds each ``key -> (types, required)``.

    The usual body of a family's ``check_metadata``: a saved config naming the family must carry
    what ``from_canonical`` reads, each of one of the accepted types (``type(None)`` for null).
    """
    family = meta.get("family", "vitrim")
    fix = "re-save the model with vitrim.save, which records the family's class and config"
    for key, (types, required) in keys.items():
        if key not in meta:
            if required:
                raise ModelFileError(f"the model config names family {family!r} but has no {key!r}; {fix}")
            continue
        value = meta[key]
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            expected = " or ".join("null" if t is type(None) else t.__name__ for t in types)
            raise ModelFileError(f"the model config's {key!r} must be {expected}, got {value!r}; {fix}")


def supported_text() -> str:
    """Every family's summary, for "supported:" messages."""
    return "; ".join(f.summary for f in families())


def unsupported(what: str) -> ConfigError:
    """The error for a model vitrim cannot convert, naming the families it supports."""
    return ConfigError(f"{what} is not a model vitrim knows; supported: {supported_text()}")

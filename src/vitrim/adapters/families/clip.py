"""The CLIP vision family: ``transformers`` ``CLIPVisionModel`` and ``CLIPVisionModelWithProjection``
<-> the canonical vitrim ViT, weights and per-layer dims both ways.

CLIP's image tower is a pre-norm ViT with a LayerNorm on the embedded sequence (``pre_layrnorm``:
canonical ``pre_norm``), a bias-free patch convolution (``patch_bias=False``), quick-GELU MLPs and a
class token whose output is normalised by ``post_layernorm`` after pooling (canonical ``fc_norm``:
``last_hidden_state`` is the un-normalised encoder output, the canonical ``forward_features``, and
``pooler_output`` is the canonical ``pooled``). ``CLIPVisionModelWithProjection``'s bias-free
``visual_projection`` is the canonical head (``image_embeds`` are the canonical logits); a plain
``CLIPVisionModel`` has no head and is pruned by the distance to its own output features.

The encoder layers (``self_attn`` with ``q/k/v/out_proj``, ``layer_norm1``, ``mlp`` with ``fc1/fc2``,
``layer_norm2``) are the same in SigLIP: :mod:`vitrim.adapters.families.siglip` uses the layer
helpers here. Only the vision classes belong to the family (not a full ``CLIPModel``), at their
config's image size (no ``interpolate_pos_encoding``).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from vitrim.adapters.hf_common import (block_dims, block_from_canonical, block_to_canonical, check_hf_config,
                                      check_one_head_dim, hf_metadata, hf_metadata_check, require_transformers,
                                      resize_block)
from vitrim.adapters.registry import WHOLE_HEADS, Family, register
from vitrim.errors import ConfigError
from vitrim.models import BlockDims, ViTConfig, VisionTransformer

# class -> (attribute holding the CLIPVisionModel or None, config class, has visual_projection)
CLASSES: dict[str, tuple[str | None, str, bool]] = {
    "CLIPVisionModel": (None, "CLIPVisionConfig", False),
    "CLIPVisionModelWithProjection": ("vision_model", "CLIPVisionConfig", True),
}
# Hugging Face hidden_act -> canonical mlp_act
ACTIVATIONS = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "silu": "silu",
               "swish": "silu"}
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SIZE_DEFAULTS = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072,
                 "image_size": 224, "patch_size": 32, "num_channels": 3}
def recognizes(model: Any) -> bool:
    """True for a live ``transformers`` CLIP vision model of a class this family converts."""
    return type(model).__name__ in CLASSES and type(model).__module__.startswith("transformers.")


def _tower(model: nn.Module) -> nn.Module:
    """The ``CLIPVisionModel`` (the model itself, or the projection model's ``vision_model``)."""
    attr = CLASSES[type(model).__name__][0]
    return getattr(model, attr) if attr else model


def _projection(model: nn.Module) -> nn.Linear | None:
    head = getattr(model, "visual_projection", None)
    return head if isinstance(head, nn.Linear) else None


def check_activation(hidden_act: Any, family: str) -> str:
    """The canonical ``mlp_act`` of a Hugging Face ``hidden_act``; a :class:`ConfigError` naming the
    supported ones otherwise."""
    if not isinstance(hidden_act, str) or hidden_act not in ACTIVATIONS:
        raise ConfigError(f"{family} hidden_act {hidden_act!r} is not supported (supported: "
                          f"{', '.join(ACTIVATIONS)})")
    return ACTIVATIONS[hidden_act]


def check_square(cfg: Any) -> None:
    """A :class:`ConfigError` unless ``image_size`` / ``patch_size`` are single ints (square)."""
    if not isinstance(cfg.image_size, int) or not isinstance(cfg.patch_size, int):
        raise ConfigError(f"only square images and patches (int image_size / patch_size) are supported, got "
                          f"image_size={cfg.image_size!r}, patch_size={cfg.patch_size!r}")


def check(model: nn.Module) -> None:
    """A :class:`ConfigError` naming what vitrim cannot convert in ``model``."""
    cfg = model.config
    check_activation(cfg.hidden_act, "CLIP")
    check_square(cfg)
    if CLASSES[type(model).__name__][2] and _projection(model) is None:
        raise ConfigError(f"{type(model).__name__} has no visual_projection layer")
    rows = _tower(model).embeddings.position_embedding.weight.shape[0]
    if rows != 1 + (cfg.image_size // cfg.patch_size) ** 2:
        raise ConfigError(f"the position embedding holds {rows} rows, not 1 + ({cfg.image_size} // "
                          f"{cfg.patch_size})**2; vitrim converts CLIP at its config's image size only")


def head_kind(model: nn.Module) -> str:
    """``"pooler"`` for the projection model (``image_embeds`` are an output layer), else ``"none"``."""
    return "pooler" if _projection(model) is not None else "none"


# --- encoder layers, shared with SigLIP ------------------------------------------------------

def layer_dims(layer: nn.Module) -> BlockDims:
    """One CLIP/SigLIP encoder layer's canonical dims (a removed attention or MLP has none)."""
    return block_dims(layer.self_attn, layer.mlp, scale="scale")


def layer_state(layer: nn.Module, p: str) -> dict[str, torch.Tensor]:
    """The canonical block ``p`` (``"blocks.i."``) weights of one CLIP/SigLIP encoder layer."""
    return block_to_canonical(p, layer.self_attn, "out_proj", layer.layer_norm1, layer.mlp, layer.layer_norm2)


def resize_layers(layers: nn.ModuleList, cfg: ViTConfig) -> None:
    """Give every CLIP/SigLIP encoder layer the canonical block's widths (per layer: one HF config
    cannot say them); ``num_heads`` / ``embed_dim`` are kept true for readers."""
    for layer, d in zip(layers, cfg.blocks):
        layer.self_attn, layer.mlp = resize_block(layer.self_attn, layer.mlp, d, cfg, out_proj="out_proj",
                                                  scale="scale", heads="num_heads")
        if d.attention:
            layer.self_attn.embed_dim = cfg.embed_dim


def layers_hf_state(src: dict[str, torch.Tensor], cfg: ViTConfig, prefix: str) -> dict[str, torch.Tensor]:
    """The encoder layers' HF weights (names under ``prefix``, e.g. ``"encoder.layers."``) from a
    canonical state dict ``src``."""
    state: dict[str, torch.Tensor] = {}
    for i, d in enumerate(cfg.blocks):
        q = f"{prefix}{i}."
        state.update(block_from_canonical(src, f"blocks.{i}.", d, {
            "attention": q + "self_attn", "out_proj": q + "self_attn.out_proj", "norm1": q + "layer_norm1",
            "mlp": q + "mlp", "norm2": q + "layer_norm2"}))
    return state


def construction_heads(embed_dim: int, heads: Any) -> int:
    """A ``num_attention_heads`` that divides ``embed_dim``, for building a model whose layers are
    then resized (HF checks the divisibility): ``heads`` when it divides, else their gcd."""
    heads = heads if isinstance(heads, int) and not isinstance(heads, bool) and heads > 0 else 1
    return heads if embed_dim % heads == 0 else math.gcd(embed_dim, heads)


def load_checked(model: nn.Module, state: dict[str, torch.Tensor], removed_norms: tuple[str, ...]) -> nn.Module:
    """Load ``state`` into ``model``; only the LayerNorms before removed sub-layers (``removed_norms``,
    full names) may be left out. Returns the model in eval mode."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    left = [k for k in missing if k not in removed_norms]
    if unexpected or left:
        raise ConfigError(f"weights did not map onto {type(model).__name__}: missing {left[:5]}, "
                          f"unexpected {unexpected[:5]}")
    return model.eval()


def removed_norm_names(cfg: ViTConfig, prefix: str) -> tuple[str, ...]:
    """The HF names of the LayerNorms in front of removed sub-layers (they stay, unused)."""
    names: list[str] = []
    for i, d in enumerate(cfg.blocks):
        for kept, norm in ((d.attention, "layer_norm1"), (d.mlp, "layer_norm2")):
            if not kept:
                names += [f"{prefix}{i}.{norm}.weight", f"{prefix}{i}.{norm}.bias"]
    return tuple(names)


# --- CLIP <-> canonical ----------------------------------------------------------------------

def to_canonical(model: nn.Module) -> VisionTransformer:
    """The equivalent canonical ViT (a copy; the HF model is not changed)."""
    check(model)
    cfg, tower = model.config, _tower(model)
    head = _projection(model)
    C = tower.embeddings.patch_embedding.out_channels
    num_classes = head.out_features if head is not None else 1
    three = cfg.num_channels == 3
    canonical_cfg = ViTConfig(
        image_size=cfg.image_size, patch_size=cfg.patch_size, in_chans=cfg.num_channels, num_classes=num_classes,
        embed_dim=C, blocks=[layer_dims(layer) for layer in tower.encoder.layers], class_token=True, pool="cls",
        fc_norm=True, pre_norm=True, patch_bias=False, head_bias=False, mlp_act=check_activation(cfg.hidden_act, "CLIP"),
        qkv_bias=True, norm_eps=float(cfg.layer_norm_eps),
        mean=CLIP_MEAN if three else (0.5,) * cfg.num_channels, std=CLIP_STD if three else (0.5,) * cfg.num_channels)
    canonical = VisionTransformer(canonical_cfg)
    canonical.load_state_dict(_to_canonical_state(model, canonical_cfg), strict=True)
    return canonical.eval()


def _to_canonical_state(model: nn.Module, canonical_cfg: ViTConfig) -> dict[str, torch.Tensor]:
    tower = _tower(model)
    emb, C = tower.embeddings, canonical_cfg.embed_dim
    state = {"patch_embed.proj.weight": emb.patch_embedding.weight,
             "cls_token": emb.class_embedding.reshape(1, 1, C),  # (C,) -> (1, 1, C)
             "pos_embed": emb.position_embedding.weight.unsqueeze(0),  # (1 + P, C) -> (1, 1 + P, C)
             "norm_pre.weight": tower.pre_layrnorm.weight, "norm_pre.bias": tower.pre_layrnorm.bias,
             "norm.weight": tower.post_layernorm.weight, "norm.bias": tower.post_layernorm.bias}
    for i, layer in enumerate(tower.encoder.layers):
        state.update(layer_state(layer, f"blocks.{i}."))
    head = _projection(model)
    # a backbone: the canonical head is a zero placeholder with one output
    state["head.weight"] = head.weight if head is not None else torch.zeros(1, C)
    return {k: v.detach().clone() for k, v in state.items()}



def from_canonical(canonical: VisionTransformer, meta: dict[str, Any]) -> nn.Module:
    """The CLIP model of ``meta["hf_class"]`` carrying ``canonical``'s dims and weights."""
    transformers = require_transformers()
    cfg, hf_class = canonical.config, meta["hf_class"]
    if hf_class not in CLASSES:
        raise ConfigError(f"unsupported CLIP class {hf_class!r} ({', '.join(CLASSES)})")
    if not (cfg.class_token and cfg.pool == "cls" and cfg.fc_norm and cfg.pre_norm and not cfg.patch_bias
            and not cfg.head_bias and cfg.num_prefix_tokens == 1 and cfg.pos_embed_grid is None):
        raise ConfigError("this canonical ViT does not have CLIP's structure (class token, pool 'cls', fc_norm, "
                          "pre_norm, no patch or head bias, no other prefix tokens); it cannot become a CLIP model")
    check_one_head_dim(cfg, "CLIP")
    attr, config_class, projection = CLASSES[hf_class]
    hf_config = meta["hf_config"]
    sizes: dict[str, Any] = {"hidden_size": cfg.embed_dim, "num_hidden_layers": cfg.depth,
                             "image_size": cfg.image_size, "patch_size": cfg.patch_size, "num_channels": cfg.in_chans,
                             "num_attention_heads": construction_heads(cfg.embed_dim,
                                                                       hf_config.get("num_attention_heads"))}
    if projection:
        sizes["projection_dim"] = cfg.num_classes
    config = getattr(transformers, config_class).from_dict({**hf_config, **sizes})
    model = getattr(transformers, hf_class)(config)
    tower = _tower(model)
    resize_layers(tower.encoder.layers, cfg)
    prefix = f"{attr}." if attr else ""
    return load_checked(model, _to_hf_state(canonical, prefix, projection),
                        removed_norm_names(cfg, f"{prefix}encoder.layers."))


def _to_hf_state(canonical: VisionTransformer, prefix: str, projection: bool) -> dict[str, torch.Tensor]:
    cfg, src = canonical.config, canonical.state_dict()
    state = {"embeddings.patch_embedding.weight": src["patch_embed.proj.weight"],
             "embeddings.class_embedding": src["cls_token"].reshape(cfg.embed_dim),  # (1, 1, C) -> (C,)
             "embeddings.position_embedding.weight": src["pos_embed"][0],  # (1, 1 + P, C) -> (1 + P, C)
             "pre_layrnorm.weight": src["norm_pre.weight"], "pre_layrnorm.bias": src["norm_pre.bias"],
             "post_layernorm.weight": src["norm.weight"], "post_layernorm.bias": src["norm.bias"],
             **layers_hf_state(src, cfg, "encoder.layers.")}
    state = {prefix + k: v for k, v in state.items()}
    if projection:
        state["visual_projection.weight"] = src["head.weight"]
    return state


def check_config(config: dict[str, Any], source: Any) -> None:
    """Type- and size-check a CLIP vision ``config.json`` before transformers builds anything."""
    check_hf_config(config, source, defaults=SIZE_DEFAULTS, labels=False)



def infer_class(config: dict[str, Any], names: list[str]) -> str:
    """The class a ``config.json`` without ``architectures`` describes, from its weight names."""
    projection = any(n.startswith("visual_projection.") for n in names)
    return "CLIPVisionModelWithProjection" if projection else "CLIPVisionModel"


FAMILY = register(Family(
    name="hf-clip",
    summary="Hugging Face CLIP vision (CLIPVisionModel, CLIPVisionModelWithProjection)",
    recognizes=recognizes,
    to_canonical=to_canonical,
    from_canonical=from_canonical,
    metadata=hf_metadata,
    check_metadata=hf_metadata_check(check_config),
    head_kind=head_kind,
    prunable=WHOLE_HEADS,
    hf_classes=tuple(CLASSES),
    hf_model_types=("clip_vision_model",),
    hf_config_class=lambda hf_class: CLASSES[hf_class][1],
    hf_infer_class=infer_class,
    hf_check_config=check_config,
    check=check,
))

"""The Hugging Face family: ``transformers`` ViT / DeiT <-> the canonical vitrim ViT, weights and dims both ways.

Pruning stays family-agnostic: a ``ViTForImageClassification`` (or DeiT) is converted to the canonical
model (exactly: same outputs), pruned there, and converted back into the same HF class with
per-layer dims. HF's attention reads ``head_dim``/``scaling`` from the module and infers the
head count from ``q_proj``, so per-layer heads and head dims need no code change; a removed
sub-layer becomes a module that adds nothing. One HF config cannot express per-layer dims, so
vitrim saves such a model in its own format (family ``hf``, the HF config, the dimension plan).

A ``ViTModel``/``DeiTModel`` pooler (dense + activation on the class token) becomes the canonical
model's head: the canonical logits are the pooler's pre-activation, so pruning the embedding
channels slices the pooler's input columns like any head's, and its output width stays.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from vitrim.adapters import hf_common
from vitrim.adapters.hf_common import (HF_METADATA_KEYS, RemovedAttention, RemovedMlp, block_from_canonical,
                                       block_to_canonical, check_hf_config, hf_metadata_check)
from vitrim.adapters.registry import WHOLE_HEADS, Family, register
from vitrim.errors import ConfigError
from vitrim.models import BlockDims, ViTConfig, VisionTransformer

# class -> (attribute holding the backbone or None, config class, classifier attributes)
CLASSES: dict[str, tuple[str | None, str, tuple[str, ...]]] = {
    "ViTForImageClassification": ("vit", "ViTConfig", ("classifier",)),
    "ViTModel": (None, "ViTConfig", ()),
    "DeiTForImageClassification": ("deit", "DeiTConfig", ("classifier",)),
    "DeiTForImageClassificationWithTeacher": ("deit", "DeiTConfig", ("cls_classifier", "distillation_classifier")),
    "DeiTModel": (None, "DeiTConfig", ()),
}
SUPPORTED = tuple(CLASSES)


def is_hf_vit(model: Any) -> bool:
    """True for a live ``transformers`` ViT/DeiT of a class this family converts."""
    return type(model).__name__ in SUPPORTED and type(model).__module__.startswith("transformers.")


def _backbone(model: nn.Module) -> nn.Module:
    attr = CLASSES[type(model).__name__][0]
    return getattr(model, attr) if attr else model


def _classifiers(model: nn.Module) -> list[nn.Linear]:
    heads = [getattr(model, name) for name in CLASSES[type(model).__name__][2]]
    return [h for h in heads if isinstance(h, nn.Linear)]


def check(model: nn.Module) -> None:
    """Raise a :class:`ConfigError` naming what vitrim cannot convert in ``model``."""
    if not is_hf_vit(model):
        raise ConfigError(f"{type(model).__name__} is not a supported Hugging Face ViT ({', '.join(SUPPORTED)})")
    cfg = model.config
    if CLASSES[type(model).__name__][2] and len(_classifiers(model)) != len(CLASSES[type(model).__name__][2]):
        raise ConfigError(f"{type(model).__name__} has no classification head (num_labels=0 is not supported)")
    if cfg.hidden_act != "gelu":
        raise ConfigError(f"hidden_act {cfg.hidden_act!r} is not supported (vitrim's ViT uses exact GELU)")
    if not isinstance(cfg.image_size, int) or not isinstance(cfg.patch_size, int):
        raise ConfigError("only square images and patches (int image_size / patch_size) are supported")


def _pooler(model: nn.Module) -> nn.Linear | None:
    """The pooler's dense layer of a ``ViTModel``/``DeiTModel`` built with ``add_pooling_layer=True``."""
    pooler = getattr(_backbone(model), "pooler", None)
    return pooler.dense if pooler is not None else None


def head_kind(model: nn.Module) -> str:
    """``"classifier"``, ``"pooler"`` or ``"none"``."""
    if _classifiers(model):
        return "classifier"
    return "pooler" if _pooler(model) is not None else "none"


def _heads(model: nn.Module) -> list[nn.Linear]:
    """The layers that become the canonical head(s): the classifier(s), else the pooler's dense."""
    pooler = _pooler(model)
    return _classifiers(model) or ([pooler] if pooler is not None else [])


def block_dims(layer: nn.Module) -> BlockDims:
    """One HF layer's canonical dims (a removed attention or MLP has none)."""
    attn, mlp = layer.attention, layer.mlp
    has_attn, has_mlp = not isinstance(attn, RemovedAttention), not isinstance(mlp, RemovedMlp)
    if has_attn:
        heads = attn.q_proj.out_features // attn.head_dim
        dims = dict(heads=heads, qk_dim=attn.head_dim, v_dim=attn.head_dim, attn_scale=float(attn.scaling))
    else:
        dims = dict(heads=0, qk_dim=0, v_dim=0, attention=False)
    return BlockDims(mlp_dim=mlp.fc1.out_features if has_mlp else 0, mlp=has_mlp, **dims)


def to_canonical(model: nn.Module) -> VisionTransformer:
    """The equivalent canonical ViT (a copy; the HF model is not changed)."""
    check(model)
    cfg, vit = model.config, _backbone(model)
    heads = _heads(model)
    num_classes = heads[0].out_features if heads else 1
    labelled = bool(_classifiers(model))
    C = vit.embeddings.patch_embeddings.projection.out_channels
    distill = getattr(vit.embeddings, "distillation_token", None) is not None
    canonical_cfg = ViTConfig(
        image_size=cfg.image_size, patch_size=cfg.patch_size, in_chans=cfg.num_channels, num_classes=num_classes,
        embed_dim=C, blocks=[block_dims(layer) for layer in vit.layers], class_token=True, distill_token=distill,
        distill_head=len(heads) == 2, pool="cls", qkv_bias=bool(cfg.qkv_bias), norm_eps=float(cfg.layer_norm_eps),
        mean=(0.5,) * cfg.num_channels, std=(0.5,) * cfg.num_channels,
        class_names=[cfg.id2label[i] for i in range(num_classes)] if labelled else None)
    canonical = VisionTransformer(canonical_cfg)
    canonical.load_state_dict(_hf_to_canonical_state(model), strict=True)
    return canonical.eval()


def _hf_to_canonical_state(model: nn.Module) -> dict[str, torch.Tensor]:
    vit = _backbone(model)
    emb = vit.embeddings
    state = {"patch_embed.proj.weight": emb.patch_embeddings.projection.weight,
             "patch_embed.proj.bias": emb.patch_embeddings.projection.bias,
             "cls_token": emb.cls_token, "pos_embed": emb.position_embeddings,
             "norm.weight": vit.layernorm.weight, "norm.bias": vit.layernorm.bias}
    if getattr(emb, "distillation_token", None) is not None:
        state["dist_token"] = emb.distillation_token
    for i, layer in enumerate(vit.layers):
        state.update(block_to_canonical(f"blocks.{i}.", layer.attention, "o_proj", layer.layernorm_before,
                                        layer.mlp, layer.layernorm_after))
    heads = _heads(model)
    for name, head in zip(("head", "head_dist"), heads):
        state[f"{name}.weight"], state[f"{name}.bias"] = head.weight, head.bias
    if not heads:  # a backbone without a pooler has no head: keep the canonical one's zero init
        C = emb.patch_embeddings.projection.out_channels
        state["head.weight"], state["head.bias"] = torch.zeros(1, C), torch.zeros(1)
    return {k: v.detach().clone() for k, v in state.items()}


def from_canonical(canonical: VisionTransformer, hf_class: str, hf_config: dict[str, Any],
                   pooler: bool = False) -> nn.Module:
    """An HF model of class ``hf_class`` carrying ``canonical``'s dims and weights.

    ``pooler``: a ``ViTModel``/``DeiTModel`` whose pooler is ``canonical``'s head.
    """
    import transformers

    cfg = canonical.config
    for i, d in enumerate(cfg.blocks):
        if d.attention and d.qk_dim != d.v_dim:
            raise ConfigError(f"block {i} has qk_dim {d.qk_dim} != v_dim {d.v_dim}; Hugging Face ViT attention "
                              f"uses one head_dim for queries, keys and values (prune them together)")
    if hf_class not in CLASSES:
        raise ConfigError(f"unsupported Hugging Face class {hf_class!r} ({', '.join(SUPPORTED)})")
    backbone_only = hf_class.endswith("Model")
    if pooler and not backbone_only:
        raise ConfigError(f"{hf_class} has no pooler (only ViTModel and DeiTModel do)")
    _, config_class, _ = CLASSES[hf_class]
    config = getattr(transformers, config_class).from_dict({**hf_config, **config_sizes(cfg, pooler)})
    model_class = getattr(transformers, hf_class)
    model = model_class(config, add_pooling_layer=pooler) if backbone_only else model_class(config)
    vit = _backbone(model)
    C = cfg.embed_dim
    for layer, d in zip(vit.layers, cfg.blocks):
        if d.attention:
            a = layer.attention
            bias = cfg.qkv_bias
            a.q_proj = nn.Linear(C, d.heads * d.qk_dim, bias=bias)
            a.k_proj = nn.Linear(C, d.heads * d.qk_dim, bias=bias)
            a.v_proj = nn.Linear(C, d.heads * d.v_dim, bias=bias)
            a.o_proj = nn.Linear(d.heads * d.v_dim, C)
            a.head_dim, a.scaling, a.num_attention_heads = d.qk_dim, d.scale, d.heads
        else:
            layer.attention = RemovedAttention()
        if d.mlp:
            layer.mlp.fc1, layer.mlp.fc2 = nn.Linear(C, d.mlp_dim), nn.Linear(d.mlp_dim, C)
        else:
            layer.mlp = RemovedMlp()
    state = _canonical_to_hf_state(canonical, model)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if "norm" not in k or "layers" not in k]:
        raise ConfigError(f"weights did not map onto {hf_class}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model.eval()


def config_sizes(cfg: ViTConfig, pooler: bool = False) -> dict[str, int]:
    """The HF config fields a dimension plan sets: the embedding (and pooler) width always; the head
    count, head width and MLP width only when every block shares them, as one config cannot say more
    (the other fields keep the dense model's values; the modules carry the per-layer widths)."""
    sizes = {"hidden_size": cfg.embed_dim, **({"pooler_output_size": cfg.num_classes} if pooler else {})}
    attention = {(d.heads, d.qk_dim) for d in cfg.blocks if d.attention}
    if len(attention) == 1 and all(d.attention for d in cfg.blocks):
        (sizes["num_attention_heads"], sizes["head_dim"]), = attention
    mlp = {d.mlp_dim for d in cfg.blocks if d.mlp}
    if len(mlp) == 1 and all(d.mlp for d in cfg.blocks):
        sizes["intermediate_size"], = mlp
    return sizes


def _canonical_to_hf_state(canonical: VisionTransformer, model: nn.Module) -> dict[str, torch.Tensor]:
    attr = CLASSES[type(model).__name__][0]
    prefix = f"{attr}." if attr else ""
    src = canonical.state_dict()
    state = {prefix + "embeddings.patch_embeddings.projection.weight": src["patch_embed.proj.weight"],
             prefix + "embeddings.patch_embeddings.projection.bias": src["patch_embed.proj.bias"],
             prefix + "embeddings.cls_token": src["cls_token"],
             prefix + "embeddings.position_embeddings": src["pos_embed"],
             prefix + "layernorm.weight": src["norm.weight"], prefix + "layernorm.bias": src["norm.bias"]}
    if "dist_token" in src:
        state[prefix + "embeddings.distillation_token"] = src["dist_token"]
    for i, d in enumerate(canonical.config.blocks):
        q = f"{prefix}layers.{i}."
        state.update(block_from_canonical(src, f"blocks.{i}.", d, {
            "attention": q + "attention", "out_proj": q + "attention.o_proj", "norm1": q + "layernorm_before",
            "mlp": q + "mlp", "norm2": q + "layernorm_after"}))
    targets = CLASSES[type(model).__name__][2] or (("pooler.dense",) if _pooler(model) is not None else ())
    for name, head in zip(targets, ("head", "head_dist")):
        state[f"{name}.weight"], state[f"{name}.bias"] = src[f"{head}.weight"], src[f"{head}.bias"]
    return state


def hf_metadata(model: nn.Module) -> dict[str, Any]:
    """Class, config and pooler presence: what :func:`from_canonical` needs (JSON-serialisable)."""
    return {**hf_common.hf_metadata(model), "hf_pooler": _pooler(model) is not None}


def _rebuild(canonical: VisionTransformer, meta: dict[str, Any]) -> nn.Module:
    return from_canonical(canonical, meta["hf_class"], meta["hf_config"], pooler=bool(meta.get("hf_pooler", False)))


METADATA_KEYS = {**HF_METADATA_KEYS, "hf_pooler": ((bool,), False)}


def check_config(config: dict[str, Any], source: Any) -> None:
    """Type- and size-check a ViT/DeiT ``config.json`` before transformers builds anything."""
    check_hf_config(config, source, num_prefix_tokens=2 if config.get("model_type") == "deit" else 1)



def infer_class(config: dict[str, Any], names: list[str]) -> str:
    """The class a ``config.json`` without ``architectures`` describes, from its weight names."""
    prefix = "DeiT" if config.get("model_type") == "deit" else "ViT"
    if any(n.startswith("cls_classifier.") for n in names):
        return "DeiTForImageClassificationWithTeacher"
    return f"{prefix}ForImageClassification" if any(n.startswith("classifier.") for n in names) else f"{prefix}Model"


def load_options(hf_class: str, names: list[str]) -> dict[str, Any]:
    """``add_pooling_layer`` for a ``ViTModel``/``DeiTModel``: whether the weights hold a pooler."""
    if hf_class.endswith("Model"):
        return {"add_pooling_layer": any(n.endswith("pooler.dense.weight") for n in names)}
    return {}


FAMILY = register(Family(
    name="hf",
    summary=("Hugging Face ViT/DeiT (ViTForImageClassification, ViTModel, "
             "DeiTForImageClassification[WithTeacher], DeiTModel; a save_pretrained directory or hf:DIR)"),
    recognizes=is_hf_vit,
    to_canonical=to_canonical,
    from_canonical=_rebuild,
    metadata=hf_metadata,
    check_metadata=hf_metadata_check(check_config, METADATA_KEYS),
    head_kind=head_kind,
    prunable=WHOLE_HEADS,
    hf_classes=SUPPORTED,
    hf_model_types=("vit", "deit"),
    hf_config_class=lambda hf_class: CLASSES[hf_class][1],
    hf_infer_class=infer_class,
    hf_check_config=check_config,
    hf_load_options=load_options,
    order=10,
    check=check,
))

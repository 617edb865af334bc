"""The DINOv2 family: ``transformers`` ``Dinov2Model``, ``Dinov2ForImageClassification`` and their
``WithRegisters`` variants <-> the canonical vitrim ViT, weights and per-layer dims both ways.

DINOv2 is a pre-norm ViT with LayerScale, an optional SwiGLU MLP (the giant variant; the
canonical gated MLP, pruned in gate/up pairs), register tokens (after the class token, without a
position embedding: the canonical model holds zero position rows for them, folded back into the
registers on the way out) and position embeddings stored for ``config.image_size`` and resized
bicubically for other sizes (canonical ``pos_embed_grid``; :func:`to_canonical` takes the image
size the model will run at). The classifier reads the class token and the mean patch token
concatenated (canonical ``pool="cls_mean"``). A backbone (``Dinov2Model``) has no head: it is
pruned by the distance to its own output features.

Not carried over: the mask token, used only by masked-image pre-training (it comes back as zeros).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from vitrim.adapters.hf_common import (block_dims, block_from_canonical, block_to_canonical, check_hf_config,
                                      check_one_head_dim, hf_metadata, hf_metadata_check, resize_block)
from vitrim.adapters.registry import WHOLE_HEADS, Family, register
from vitrim.errors import ConfigError
from vitrim.models import ViTConfig, VisionTransformer

# class -> (attribute holding the backbone or None, config class, has register tokens)
CLASSES: dict[str, tuple[str | None, str, bool]] = {
    "Dinov2Model": (None, "Dinov2Config", False),
    "Dinov2ForImageClassification": ("dinov2", "Dinov2Config", False),
    "Dinov2WithRegistersModel": (None, "Dinov2WithRegistersConfig", True),
    "Dinov2WithRegistersForImageClassification": ("dinov2_with_registers", "Dinov2WithRegistersConfig", True),
}
# Hugging Face hidden_act -> canonical mlp_act
ACTIVATIONS = {"gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "quick_gelu": "quick_gelu", "silu": "silu",
               "swish": "silu"}
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SIZE_DEFAULTS = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072,
                 "image_size": 224, "patch_size": 14, "num_channels": 3}


def recognizes(model: Any) -> bool:
    return type(model).__name__ in CLASSES and type(model).__module__.startswith("transformers.")


def _backbone(model: nn.Module) -> nn.Module:
    attr = CLASSES[type(model).__name__][0]
    return getattr(model, attr) if attr else model


def _has_registers(model: nn.Module) -> bool:
    return CLASSES[type(model).__name__][2]


def _classifier(model: nn.Module) -> nn.Linear | None:
    head = getattr(model, "classifier", None)
    return head if isinstance(head, nn.Linear) else None


def check(model: nn.Module) -> None:
    """A :class:`ConfigError` naming what vitrim cannot convert in ``model``."""
    cfg = model.config
    if hasattr(model, "classifier") and _classifier(model) is None:
        raise ConfigError(f"{type(model).__name__} has no classification head (num_labels=0); use "
                          f"{type(model).__name__.split('For')[0]}Model for a backbone")
    if not cfg.use_swiglu_ffn and cfg.hidden_act not in ACTIVATIONS:
        raise ConfigError(f"hidden_act {cfg.hidden_act!r} is not supported (supported: {', '.join(ACTIVATIONS)})")
    if not isinstance(cfg.image_size, int) or not isinstance(cfg.patch_size, int):
        raise ConfigError("only square images and patches (int image_size / patch_size) are supported")


def head_kind(model: nn.Module) -> str:
    return "classifier" if _classifier(model) is not None else "none"


def stored_grid(model: nn.Module) -> int:
    """Side of the patch grid the position embedding holds."""
    rows = _backbone(model).embeddings.position_embeddings.shape[1] - 1
    side = math.isqrt(rows)
    if side * side != rows:
        raise ConfigError(f"the position embedding holds {rows} patch rows, not a square grid")
    return side


def to_canonical(model: nn.Module, image_size: int | None = None) -> VisionTransformer:
    """The equivalent canonical ViT (a copy). ``image_size``: the size the model will see (default
    ``config.image_size``); position embeddings are resized to it as DINOv2 does."""
    check(model)
    cfg, backbone = model.config, _backbone(model)
    head = _classifier(model)
    C = backbone.embeddings.patch_embeddings.projection.out_channels
    image_size = image_size or cfg.image_size
    if image_size % cfg.patch_size:
        raise ConfigError(f"image size {image_size} is not a multiple of the patch size {cfg.patch_size}")
    grid = stored_grid(model)
    registers = cfg.num_register_tokens if _has_registers(model) else 0
    num_classes = head.out_features if head is not None else 1
    canonical_cfg = ViTConfig(
        image_size=image_size, patch_size=cfg.patch_size, in_chans=cfg.num_channels, num_classes=num_classes,
        embed_dim=C, blocks=[block_dims(layer.attention, layer.mlp) for layer in backbone.encoder.layer], class_token=True,
        reg_tokens=registers, pool="cls_mean" if head is not None else "cls", layer_scale_init=1.0,
        qkv_bias=bool(cfg.qkv_bias), norm_eps=float(cfg.layer_norm_eps),
        mlp_act="silu" if cfg.use_swiglu_ffn else ACTIVATIONS[cfg.hidden_act], mlp_gated=bool(cfg.use_swiglu_ffn),
        pos_embed_grid=None if grid == image_size // cfg.patch_size else grid, pos_embed_antialias=registers > 0,
        mean=IMAGENET_MEAN[: cfg.num_channels] if cfg.num_channels == 3 else (0.5,) * cfg.num_channels,
        std=IMAGENET_STD[: cfg.num_channels] if cfg.num_channels == 3 else (0.5,) * cfg.num_channels,
        class_names=[cfg.id2label[i] for i in range(num_classes)] if head is not None else None)
    canonical = VisionTransformer(canonical_cfg)
    canonical.load_state_dict(_to_canonical_state(model, canonical_cfg), strict=True)
    return canonical.eval()


def _to_canonical_state(model: nn.Module, canonical_cfg: ViTConfig) -> dict[str, torch.Tensor]:
    emb = _backbone(model).embeddings
    C, R = canonical_cfg.embed_dim, canonical_cfg.reg_tokens
    pos = emb.position_embeddings  # (1, 1 + P, C): class token, then patches; registers have none
    state = {"patch_embed.proj.weight": emb.patch_embeddings.projection.weight,
             "patch_embed.proj.bias": emb.patch_embeddings.projection.bias, "cls_token": emb.cls_token,
             "pos_embed": torch.cat([pos[:, :1], pos.new_zeros(1, R, C), pos[:, 1:]], dim=1),
             "norm.weight": _backbone(model).layernorm.weight, "norm.bias": _backbone(model).layernorm.bias}
    if R:
        state["reg_token"] = emb.register_tokens
    for i, layer in enumerate(_backbone(model).encoder.layer):
        state.update(_layer_state(layer, f"blocks.{i}."))
    head = _classifier(model)
    if head is not None:
        state["head.weight"], state["head.bias"] = head.weight, head.bias
    else:  # a backbone: the canonical head is a zero placeholder
        state["head.weight"], state["head.bias"] = torch.zeros(1, canonical_cfg.pooled_dim), torch.zeros(1)
    return {k: v.detach().clone() for k, v in state.items()}


def _layer_state(layer: nn.Module, p: str) -> dict[str, torch.Tensor]:
    state = block_to_canonical(p, layer.attention, "o_proj", layer.norm1, layer.mlp, layer.norm2)
    if p + "attn.proj.weight" in state:
        state[p + "ls1.gamma"] = layer.layer_scale1.lambda1
    if p + "mlp.fc2.weight" in state:
        state[p + "ls2.gamma"] = layer.layer_scale2.lambda1
    return state



def from_canonical(canonical: VisionTransformer, meta: dict[str, Any]) -> nn.Module:
    """The DINOv2 model of ``meta["hf_class"]`` carrying ``canonical``'s dims and weights."""
    from vitrim.adapters.hf_common import require_transformers

    transformers = require_transformers()
    cfg, hf_class = canonical.config, meta["hf_class"]
    if hf_class not in CLASSES:
        raise ConfigError(f"unsupported DINOv2 class {hf_class!r} ({', '.join(CLASSES)})")
    check_one_head_dim(cfg, "DINOv2")
    sizes = {"hidden_size": cfg.embed_dim, "image_size": cfg.stored_grid * cfg.patch_size,
             "num_hidden_layers": cfg.depth}
    if cfg.pool == "cls_mean":
        sizes["num_labels"] = cfg.num_classes
    config = getattr(transformers, CLASSES[hf_class][1]).from_dict({**meta["hf_config"], **sizes})
    model = getattr(transformers, hf_class)(config)
    _resize_layers(_backbone(model), cfg)
    if _classifier(model) is not None:
        model.classifier = nn.Linear(cfg.pooled_dim, cfg.num_classes)
    missing, unexpected = model.load_state_dict(_to_hf_state(canonical, model), strict=False)
    allowed = ("norm1.", "norm2.", "layer_scale1.", "layer_scale2.", "mask_token")
    if unexpected or [k for k in missing if not any(a in k for a in allowed)]:
        raise ConfigError(f"weights did not map onto {hf_class}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model.eval()


def _resize_layers(backbone: nn.Module, cfg: ViTConfig) -> None:
    """Give every layer the canonical block's widths (per layer: one HF config cannot say them)."""
    for layer, d in zip(backbone.encoder.layer, cfg.blocks):
        layer.attention, layer.mlp = resize_block(layer.attention, layer.mlp, d, cfg, out_proj="o_proj",
                                                  scale="scaling", heads="num_attention_heads")


def _to_hf_state(canonical: VisionTransformer, model: nn.Module) -> dict[str, torch.Tensor]:
    attr = CLASSES[type(model).__name__][0]
    prefix = f"{attr}." if attr else ""
    cfg, src = canonical.config, canonical.state_dict()
    R = cfg.reg_tokens
    pos = src["pos_embed"]
    state = {"embeddings.patch_embeddings.projection.weight": src["patch_embed.proj.weight"],
             "embeddings.patch_embeddings.projection.bias": src["patch_embed.proj.bias"],
             "embeddings.cls_token": src["cls_token"],
             "embeddings.position_embeddings": torch.cat([pos[:, :1], pos[:, 1 + R:]], dim=1),
             "layernorm.weight": src["norm.weight"], "layernorm.bias": src["norm.bias"]}
    if R:  # registers get no position embedding in DINOv2: fold the canonical rows into them
        state["embeddings.register_tokens"] = src["reg_token"] + pos[:, 1:1 + R]
    for i, d in enumerate(cfg.blocks):
        p, q = f"blocks.{i}.", f"encoder.layer.{i}."
        state.update(block_from_canonical(src, p, d, {
            "attention": q + "attention", "out_proj": q + "attention.o_proj", "norm1": q + "norm1",
            "mlp": q + "mlp", "norm2": q + "norm2"}, gated=cfg.mlp_gated))
        if d.attention:
            state[q + "layer_scale1.lambda1"] = src[p + "ls1.gamma"]
        if d.mlp:
            state[q + "layer_scale2.lambda1"] = src[p + "ls2.gamma"]
    state = {prefix + k: v for k, v in state.items()}
    if _classifier(model) is not None:
        state["classifier.weight"], state["classifier.bias"] = src["head.weight"], src["head.bias"]
    return state


def check_config(config: dict[str, Any], source: Any) -> None:
    """Type- and size-check a DINOv2 ``config.json`` before transformers builds anything."""
    sizes = dict(config)
    ratio = config.get("mlp_ratio", 4)
    width = config.get("hidden_size", SIZE_DEFAULTS["hidden_size"])
    if isinstance(ratio, (int, float)) and not isinstance(ratio, bool) and isinstance(width, int):
        sizes.setdefault("intermediate_size", max(1, int(width * ratio)))
    registers = config.get("num_register_tokens", 0) if config.get("model_type") == "dinov2_with_registers" else 0
    check_hf_config(sizes, source, defaults=SIZE_DEFAULTS,
                    num_prefix_tokens=1 + (registers if isinstance(registers, int) else 0),
                    labels=bool(config.get("architectures")) and "For" in str(config["architectures"][0]))



def infer_class(config: dict[str, Any], names: list[str]) -> str:
    """The class a ``config.json`` without ``architectures`` describes, from its weight names."""
    base = "Dinov2WithRegisters" if config.get("model_type") == "dinov2_with_registers" else "Dinov2"
    return f"{base}ForImageClassification" if any(n.startswith("classifier.") for n in names) else f"{base}Model"


FAMILY = register(Family(
    name="hf-dinov2",
    summary=("Hugging Face DINOv2 (Dinov2Model, Dinov2ForImageClassification, Dinov2WithRegistersModel, "
             "Dinov2WithRegistersForImageClassification)"),
    recognizes=recognizes,
    to_canonical=to_canonical,
    from_canonical=from_canonical,
    metadata=hf_metadata,
    check_metadata=hf_metadata_check(check_config),
    head_kind=head_kind,
    prunable=WHOLE_HEADS,
    hf_classes=tuple(CLASSES),
    hf_model_types=("dinov2", "dinov2_with_registers"),
    hf_config_class=lambda hf_class: CLASSES[hf_class][1],
    hf_infer_class=infer_class,
    hf_check_config=check_config,
    check=check,
))

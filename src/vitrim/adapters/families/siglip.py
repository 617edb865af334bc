"""The SigLIP vision family: ``transformers`` ``SiglipVisionModel`` <-> the canonical vitrim ViT,
weights and per-layer dims both ways.

SigLIP's image tower is a pre-norm ViT without a class token (position embeddings for the patches
only), with tanh-approximated GELU MLPs and ``post_layernorm`` on every token (canonical ``norm``;
``last_hidden_state`` is the canonical ``forward_features``). Its ``SiglipMultiheadAttentionPoolingHead``
(a learned probe attending over the tokens, then a residual MLP) is the canonical attention pool
(``pool="map"``): ``pooler_output`` is the canonical ``pooled`` vector. The model has no head (the
canonical head is a zero placeholder): it is pruned by the distance to its own output features.
With ``vision_use_head=False`` there is no pooling head and ``pooler_output`` is None; the canonical
model then pools by the mean token (``pool="mean"``), which only the feature distance reads.

Pruning the embedding width keeps the pooling attention's width (canonical ``pool_dim``), which
``nn.MultiheadAttention`` cannot express (its query width is its embedding width): such a head
gets a :class:`PoolingAttention` taking the same call. The encoder layers are CLIP's: the layer
helpers come from :mod:`vitrim.adapters.families.clip`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vitrim.adapters.families.clip import (check_activation, check_square, construction_heads,
                                           layer_dims, layer_state, layers_hf_state, load_checked,
                                           removed_norm_names, resize_layers)
from vitrim.adapters.hf_common import (check_hf_config, check_one_head_dim, hf_metadata, hf_metadata_check,
                                      require_transformers)
from vitrim.adapters.registry import WHOLE_HEADS, Family, register
from vitrim.errors import ConfigError
from vitrim.models import ViTConfig, VisionTransformer

CLASSES: dict[str, str] = {"SiglipVisionModel": "SiglipVisionConfig"}  # class -> config class
SIZE_DEFAULTS = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072,
                 "image_size": 224, "patch_size": 16, "num_channels": 3}


class PoolingAttention(nn.Module):
    """The pooling head's attention when its width ``dim`` differs from the embedding width
    (``nn.MultiheadAttention`` cannot): q from the query, [k | v] from the key tokens, SDPA with
    ``heads`` heads, ``out_proj`` back to the embedding. Called as ``attention(probe, tokens,
    tokens)`` and returns ``(output, None)`` like ``nn.MultiheadAttention``; keys and values both
    come from ``key`` (the pooling head passes the same tokens twice)."""

    def __init__(self, embed_dim: int, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise ConfigError(f"the pooling attention's width {dim} is not divisible by its {heads} heads")
        self.num_heads, self.dim = heads, dim
        self.q = nn.Linear(embed_dim, dim)
        self.kv = nn.Linear(embed_dim, 2 * dim)
        self.out_proj = nn.Linear(dim, embed_dim)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *args: Any,
                **kwargs: Any) -> tuple[torch.Tensor, None]:  # (B, L, C), (B, N, C) -> (B, L, C)
        B, L, _ = query.shape
        N, H, W = key.shape[1], self.num_heads, self.dim
        q = self.q(query).view(B, L, H, W // H).transpose(1, 2)  # (B, H, L, d)
        k, v = self.kv(key).view(B, N, 2, H, W // H).permute(2, 0, 3, 1, 4)  # (B, H, N, d) each
        out = F.scaled_dot_product_attention(q, k, v)  # (B, H, L, d)
        return self.out_proj(out.transpose(1, 2).reshape(B, L, W)), None


def recognizes(model: Any) -> bool:
    """True for a live ``transformers`` SigLIP vision model of a class this family converts."""
    return type(model).__name__ in CLASSES and type(model).__module__.startswith("transformers.")


def _pool_head(model: nn.Module) -> nn.Module | None:
    return getattr(model, "head", None) if getattr(model, "use_head", False) else None


def check(model: nn.Module) -> None:
    """A :class:`ConfigError` naming what vitrim cannot convert in ``model``."""
    cfg = model.config
    check_activation(cfg.hidden_act, "SigLIP")
    check_square(cfg)
    rows = model.embeddings.position_embedding.weight.shape[0]
    if rows != (cfg.image_size // cfg.patch_size) ** 2:
        raise ConfigError(f"the position embedding holds {rows} rows, not ({cfg.image_size} // "
                          f"{cfg.patch_size})**2; vitrim converts SigLIP at its config's image size only")
    head = _pool_head(model)
    if head is not None and isinstance(head.attention, nn.MultiheadAttention):
        a = head.attention
        if not a._qkv_same_embed_dim or a.in_proj_bias is None or a.bias_k is not None or a.add_zero_attn:
            raise ConfigError("the pooling head's attention is not the standard SigLIP one (one in_proj with "
                              "bias, no bias_k/v, no zero attention)")


def head_kind(model: nn.Module) -> str:
    """Always ``"none"``: the pooling head yields an embedding, not an output layer's logits."""
    return "none"


def _pool_weights(attention: nn.Module) -> dict[str, torch.Tensor]:
    """The canonical ``attn_pool`` q / kv / proj weights of the head's attention (either kind)."""
    if isinstance(attention, PoolingAttention):
        q, kv = attention.q, attention.kv
        qw, qb, kvw, kvb = q.weight, q.bias, kv.weight, kv.bias
    else:  # nn.MultiheadAttention: in_proj rows [q; k; v], each W wide
        W = attention.embed_dim
        qw, kvw = attention.in_proj_weight.split([W, 2 * W])
        qb, kvb = attention.in_proj_bias.split([W, 2 * W])
    return {"q.weight": qw, "q.bias": qb, "kv.weight": kvw, "kv.bias": kvb,
            "proj.weight": attention.out_proj.weight, "proj.bias": attention.out_proj.bias}


def _pool_dims(attention: nn.Module) -> tuple[int, int]:
    """(width W, heads) of the head's attention."""
    if isinstance(attention, PoolingAttention):
        return attention.dim, attention.num_heads
    return attention.embed_dim, attention.num_heads


def to_canonical(model: nn.Module) -> VisionTransformer:
    """The equivalent canonical ViT (a copy; the HF model is not changed)."""
    check(model)
    cfg, head = model.config, _pool_head(model)
    C = model.embeddings.patch_embedding.out_channels
    pool: dict[str, Any] = {"pool": "mean"}
    if head is not None:
        W, heads = _pool_dims(head.attention)
        pool = {"pool": "map", "pool_heads": heads, "pool_mlp_dim": head.mlp.fc1.out_features, "pool_dim": W}
    canonical_cfg = ViTConfig(
        image_size=cfg.image_size, patch_size=cfg.patch_size, in_chans=cfg.num_channels, num_classes=1,
        embed_dim=C, blocks=[layer_dims(layer) for layer in model.encoder.layers], class_token=False, **pool,
        head_bias=False, mlp_act=check_activation(cfg.hidden_act, "SigLIP"), qkv_bias=True,
        norm_eps=float(cfg.layer_norm_eps), mean=(0.5,) * cfg.num_channels, std=(0.5,) * cfg.num_channels)
    canonical = VisionTransformer(canonical_cfg)
    canonical.load_state_dict(_to_canonical_state(model), strict=True)
    return canonical.eval()


def _to_canonical_state(model: nn.Module) -> dict[str, torch.Tensor]:
    emb = model.embeddings
    C = emb.patch_embedding.out_channels
    state = {"patch_embed.proj.weight": emb.patch_embedding.weight, "patch_embed.proj.bias": emb.patch_embedding.bias,
             "pos_embed": emb.position_embedding.weight.unsqueeze(0),  # (P, C) -> (1, P, C)
             "norm.weight": model.post_layernorm.weight, "norm.bias": model.post_layernorm.bias,
             "head.weight": torch.zeros(1, C)}  # no head: a zero placeholder with one output
    for i, layer in enumerate(model.encoder.layers):
        state.update(layer_state(layer, f"blocks.{i}."))
    head = _pool_head(model)
    if head is not None:
        state["attn_pool.probe"] = head.probe
        state.update({f"attn_pool.{k}": v for k, v in _pool_weights(head.attention).items()})
        state["attn_pool.norm.weight"], state["attn_pool.norm.bias"] = head.layernorm.weight, head.layernorm.bias
        for name in ("fc1", "fc2"):
            fc = getattr(head.mlp, name)
            state[f"attn_pool.mlp.{name}.weight"], state[f"attn_pool.mlp.{name}.bias"] = fc.weight, fc.bias
    return {k: v.detach().clone() for k, v in state.items()}


def from_canonical(canonical: VisionTransformer, meta: dict[str, Any]) -> nn.Module:
    """The SigLIP model of ``meta["hf_class"]`` carrying ``canonical``'s dims and weights."""
    transformers = require_transformers()
    cfg, hf_class = canonical.config, meta["hf_class"]
    if hf_class not in CLASSES:
        raise ConfigError(f"unsupported SigLIP class {hf_class!r} ({', '.join(CLASSES)})")
    if cfg.num_prefix_tokens or cfg.pool not in ("map", "mean") or cfg.fc_norm or cfg.pre_norm \
            or not cfg.patch_bias or cfg.pos_embed_grid is not None:
        raise ConfigError("this canonical ViT does not have SigLIP's structure (no prefix tokens, pool 'map' or "
                          "'mean', norm on the tokens, no pre-norm, a patch bias); it cannot become a SigLIP model")
    check_one_head_dim(cfg, "SigLIP")
    C, W, use_head = cfg.embed_dim, cfg.map_dim, cfg.pool == "map"
    hf_config = meta["hf_config"]
    sizes: dict[str, Any] = {"hidden_size": C, "num_hidden_layers": cfg.depth, "image_size": cfg.image_size,
                             "patch_size": cfg.patch_size, "num_channels": cfg.in_chans, "vision_use_head": use_head}
    # the pooling head is built from the config: its heads and MLP width (the layers are resized after)
    heads = cfg.pool_heads if use_head else hf_config.get("num_attention_heads")
    sizes["num_attention_heads"] = construction_heads(C, heads)
    if use_head:
        sizes["intermediate_size"] = cfg.pool_mlp_dim
    config = getattr(transformers, CLASSES[hf_class]).from_dict({**hf_config, **sizes})
    model = getattr(transformers, hf_class)(config)
    resize_layers(model.encoder.layers, cfg)
    if use_head and (W != C or model.head.attention.num_heads != cfg.pool_heads):
        model.head.attention = PoolingAttention(C, W, cfg.pool_heads)
    return load_checked(model, _to_hf_state(canonical, model), removed_norm_names(cfg, "encoder.layers."))


def _to_hf_state(canonical: VisionTransformer, model: nn.Module) -> dict[str, torch.Tensor]:
    cfg, src = canonical.config, canonical.state_dict()
    state = {"embeddings.patch_embedding.weight": src["patch_embed.proj.weight"],
             "embeddings.patch_embedding.bias": src["patch_embed.proj.bias"],
             "embeddings.position_embedding.weight": src["pos_embed"][0],  # (1, P, C) -> (P, C)
             "post_layernorm.weight": src["norm.weight"], "post_layernorm.bias": src["norm.bias"],
             **layers_hf_state(src, cfg, "encoder.layers.")}
    if cfg.pool == "map":
        p = "attn_pool."
        state["head.probe"] = src[p + "probe"]
        if isinstance(model.head.attention, PoolingAttention):
            for name in ("q", "kv"):
                state[f"head.attention.{name}.weight"] = src[p + f"{name}.weight"]
                state[f"head.attention.{name}.bias"] = src[p + f"{name}.bias"]
        else:  # nn.MultiheadAttention: in_proj rows [q; k; v]
            state["head.attention.in_proj_weight"] = torch.cat([src[p + "q.weight"], src[p + "kv.weight"]])
            state["head.attention.in_proj_bias"] = torch.cat([src[p + "q.bias"], src[p + "kv.bias"]])
        state["head.attention.out_proj.weight"] = src[p + "proj.weight"]
        state["head.attention.out_proj.bias"] = src[p + "proj.bias"]
        state["head.layernorm.weight"], state["head.layernorm.bias"] = src[p + "norm.weight"], src[p + "norm.bias"]
        for name in ("fc1", "fc2"):
            state[f"head.mlp.{name}.weight"] = src[p + f"mlp.{name}.weight"]
            state[f"head.mlp.{name}.bias"] = src[p + f"mlp.{name}.bias"]
    return state


def check_config(config: dict[str, Any], source: Any) -> None:
    """Type- and size-check a SigLIP vision ``config.json`` before transformers builds anything."""
    check_hf_config(config, source, defaults=SIZE_DEFAULTS, num_prefix_tokens=0, labels=False)



def infer_class(config: dict[str, Any], names: list[str]) -> str:
    """The class a ``config.json`` without ``architectures`` describes (there is one)."""
    return "SiglipVisionModel"


FAMILY = register(Family(
    name="hf-siglip",
    summary="Hugging Face SigLIP vision (SiglipVisionModel)",
    recognizes=recognizes,
    to_canonical=to_canonical,
    from_canonical=from_canonical,
    metadata=hf_metadata,
    check_metadata=hf_metadata_check(check_config),
    head_kind=head_kind,
    prunable=WHOLE_HEADS,
    token_reduction="tome",
    hf_classes=tuple(CLASSES),
    hf_model_types=("siglip_vision_model",),
    hf_config_class=lambda hf_class: CLASSES[hf_class],
    hf_infer_class=infer_class,
    hf_check_config=check_config,
    check=check,
))

"""The timm family: ``VisionTransformer`` (vit_*, deit_*) <-> the canonical vitrim ViT, both ways, exactly.

timm's module names match the canonical ViT's almost one to one (``patch_embed.proj``,
``blocks.i.attn.qkv``, ``ls1.gamma``, ...), so conversion is a copy. Going back builds the same
timm class at the pruned embedding width and resizes each block: ``qkv``/``proj`` and the
attention's ``num_heads``/``attn_dim``, the MLP, and a removed sub-layer becomes a module that
adds nothing. timm's fused attention derives its softmax scale from the head width, so heads
are pruned whole in this family (their query/key/value widths stay as trained).

``timm:NAME`` models are built by timm itself: random init unless ``pretrained``. Pretrained
weights come through timm from the Hugging Face Hub or its local cache (timm reads safetensors
there, and pickle files only with ``weights_only=True``); without network only cached weights
load, and vitrim says so instead of hanging on a missing download.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from vitrim.adapters.registry import WHOLE_HEADS, Family, MetadataKeys, check_metadata_keys, register, unsupported
from vitrim.errors import ConfigError, ModelFileError
from vitrim.models import BlockDims, ViTConfig, VisionTransformer

CLASSES = ("VisionTransformer", "VisionTransformerDistilled")


def is_timm_vit(model: Any) -> bool:
    """True for a live timm ViT of a class this family converts."""
    return type(model).__name__ in CLASSES and type(model).__module__.startswith("timm.")


class RemovedAttention(nn.Module):
    """Stands in for a pruned-away timm attention: adds nothing to the residual stream."""

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return torch.zeros_like(x)


class RemovedMlp(nn.Module):
    """Stands in for a pruned-away timm MLP: adds nothing to the residual stream."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(x)


def _is_ln(module: nn.Module) -> bool:
    return isinstance(module, nn.LayerNorm)


def check(model: nn.Module) -> None:
    """Raise a :class:`ConfigError` naming what vitrim cannot convert in ``model``."""
    if not is_timm_vit(model):
        raise ConfigError(f"{type(model).__name__} is not a supported timm model ({', '.join(CLASSES)})")
    problems = []
    if model.attn_pool is not None or model.global_pool not in ("token", "avg"):
        problems.append(f"global_pool={model.global_pool!r} (supported: 'token', 'avg')")
    if getattr(model, "dynamic_img_size", False):
        problems.append("dynamic_img_size=True")
    if not isinstance(model.norm_pre, nn.Identity):
        problems.append("pre_norm=True")
    if getattr(model, "pool_include_prefix", False):
        problems.append("pool_include_prefix=True")
    if not isinstance(model.patch_embed.norm, nn.Identity):
        problems.append("a patch-embedding norm")
    for i, block in enumerate(model.blocks):
        attn = block.attn
        if not isinstance(attn, RemovedAttention):
            if type(attn).__name__ != "Attention" or getattr(attn, "gate", None) is not None \
                    or not isinstance(attn.norm, nn.Identity) or attn.proj.bias is None:
                problems.append(f"block {i}'s attention ({type(attn).__name__} with extras)")
        if not isinstance(block.mlp, RemovedMlp):
            act = block.mlp.act
            if type(block.mlp).__name__ != "Mlp" or not isinstance(block.mlp.norm, nn.Identity) \
                    or not (isinstance(act, nn.GELU) and act.approximate == "none"):
                problems.append(f"block {i}'s MLP (vitrim supports Mlp with exact GELU)")
    if problems:
        raise ConfigError("this timm ViT uses what vitrim does not convert yet: " + "; ".join(problems[:4]))


def _dims(block: nn.Module) -> BlockDims:
    has_attn, has_mlp = not isinstance(block.attn, RemovedAttention), not isinstance(block.mlp, RemovedMlp)
    attn = dict(heads=block.attn.num_heads, qk_dim=block.attn.head_dim, v_dim=block.attn.head_dim) if has_attn \
        else dict(heads=0, qk_dim=0, v_dim=0, attention=False)
    return BlockDims(mlp_dim=block.mlp.fc1.out_features if has_mlp else 0, mlp=has_mlp, **attn)


def _first(blocks, predicate):
    return next((b for b in blocks if predicate(b)), None)


def to_canonical(model: nn.Module) -> VisionTransformer:
    """The equivalent canonical ViT (a copy; the timm model is not changed)."""
    check(model)
    pe = model.patch_embed
    img, patch = pe.img_size, pe.patch_size
    if img[0] != img[1] or patch[0] != patch[1]:
        raise ConfigError("only square images and patches are supported")
    C = pe.proj.out_channels
    head = model.head if isinstance(model.head, nn.Linear) else None
    with_attn = _first(model.blocks, lambda b: not isinstance(b.attn, RemovedAttention))
    norms = [m for m in model.modules() if _is_ln(m)]
    fc_norm = _is_ln(model.fc_norm)
    pretrained = getattr(model, "pretrained_cfg", None) or {}
    mean, std = pretrained.get("mean"), pretrained.get("std")
    in_chans = pe.proj.in_channels
    ls_block = _first(model.blocks, lambda b: hasattr(b.ls1, "gamma") or hasattr(b.ls2, "gamma"))
    cfg = ViTConfig(
        image_size=img[0], patch_size=patch[0], in_chans=in_chans, num_classes=head.out_features if head else 1,
        embed_dim=C, blocks=[_dims(b) for b in model.blocks], class_token=model.cls_token is not None,
        distill_token=getattr(model, "dist_token", None) is not None,
        distill_head=isinstance(getattr(model, "head_dist", None), nn.Linear), reg_tokens=model.num_reg_tokens,
        pos_embed_prefix=not model.no_embed_class, fc_norm=fc_norm,
        qk_norm=with_attn is not None and _is_ln(with_attn.attn.q_norm),
        pool="cls" if model.global_pool == "token" else "mean",
        layer_scale_init=1e-5 if ls_block is not None else None,
        qkv_bias=with_attn is not None and with_attn.attn.qkv.bias is not None,
        norm_eps=float(norms[0].eps) if norms else 1e-6,
        mean=tuple(mean) if mean and len(mean) == in_chans else (0.5,) * in_chans,
        std=tuple(std) if std and len(std) == in_chans else (0.5,) * in_chans)
    if fc_norm is False and not _is_ln(model.norm):
        raise ConfigError("a timm ViT with neither a final norm nor fc_norm is not supported")
    canonical = VisionTransformer(cfg)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith(("fc_norm.", "norm."))}
    final = model.fc_norm if fc_norm else model.norm
    state.update({"norm.weight": final.weight, "norm.bias": final.bias})
    if head is None:
        state.update({"head.weight": torch.zeros(1, C), "head.bias": torch.zeros(1)})
        state = {k: v for k, v in state.items() if not k.startswith("head_dist.")}
    missing, unexpected = canonical.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ConfigError(f"timm weights did not map onto vitrim's ViT: missing {missing[:4]}, unexpected {unexpected[:4]}")
    return canonical.eval()


def _json_safe(cfg: dict[str, Any]) -> dict[str, Any]:
    """``pretrained_cfg`` with tuples as lists and only JSON values (it is stored in config.json)."""
    plain = (str, int, float, bool, type(None))
    out: dict[str, Any] = {}
    for key, value in cfg.items():
        if isinstance(value, (tuple, list)) and all(isinstance(v, plain) for v in value):
            out[key] = list(value)
        elif isinstance(value, plain):
            out[key] = value
    return out


def timm_metadata(model: nn.Module) -> dict[str, Any]:
    """Class, pooling, class count and ``pretrained_cfg``: what :func:`from_canonical` needs."""
    return {"timm_class": type(model).__name__, "timm_global_pool": model.global_pool,
            "timm_num_classes": model.num_classes,
            "timm_pretrained_cfg": _json_safe(dict(getattr(model, "pretrained_cfg", None) or {}))}


def from_canonical(canonical: VisionTransformer, timm_class: str, timm_global_pool: str = "token",
                   timm_num_classes: int | None = None,
                   timm_pretrained_cfg: dict[str, Any] | None = None) -> nn.Module:
    """A timm model of class ``timm_class`` with ``canonical``'s dims and weights.

    ``timm_pretrained_cfg`` is restored as the model's ``pretrained_cfg`` (input size, mean, std,
    interpolation: what ``timm.data.resolve_model_data_config`` reads).
    """
    from timm.models.deit import VisionTransformerDistilled
    from timm.models.vision_transformer import VisionTransformer as TimmViT

    cfg = canonical.config
    for i, d in enumerate(cfg.blocks):
        if d.attention and (d.qk_dim != d.v_dim or abs(d.scale - d.qk_dim**-0.5) > 1e-12):
            raise ConfigError(f"block {i}: timm attention needs equal query/key and value head widths with the "
                              f"default softmax scale; prune heads (not head dims) for this family")
    num_classes = cfg.num_classes if timm_num_classes is None else timm_num_classes
    kwargs = dict(img_size=cfg.image_size, patch_size=cfg.patch_size, in_chans=cfg.in_chans,
                  num_classes=num_classes, global_pool=timm_global_pool, embed_dim=cfg.embed_dim, depth=cfg.depth,
                  num_heads=1, qkv_bias=cfg.qkv_bias, qk_norm=cfg.qk_norm,
                  init_values=cfg.layer_scale_init, class_token=cfg.class_token, no_embed_class=not cfg.pos_embed_prefix,
                  reg_tokens=cfg.reg_tokens, fc_norm=cfg.fc_norm, weight_init="skip")
    classes = {"VisionTransformer": TimmViT, "VisionTransformerDistilled": VisionTransformerDistilled}
    if timm_class not in classes:
        raise ConfigError(f"unsupported timm class {timm_class!r} ({', '.join(CLASSES)})")
    try:
        model = classes[timm_class](**kwargs)
    except AssertionError as exc:
        raise ConfigError(f"timm refused the configuration: {exc}") from None
    C = cfg.embed_dim
    for block, d in zip(model.blocks, cfg.blocks):
        if d.attention:
            a = block.attn
            a.qkv = nn.Linear(C, 3 * d.heads * d.qk_dim, bias=cfg.qkv_bias)
            a.proj = nn.Linear(d.heads * d.qk_dim, C)
            a.num_heads, a.head_dim, a.attn_dim, a.scale = d.heads, d.qk_dim, d.heads * d.qk_dim, d.qk_dim**-0.5
            if cfg.qk_norm:
                a.q_norm, a.k_norm = nn.LayerNorm(d.qk_dim, eps=cfg.norm_eps), nn.LayerNorm(d.qk_dim, eps=cfg.norm_eps)
        else:
            block.attn, block.norm1, block.ls1 = RemovedAttention(), nn.Identity(), nn.Identity()
        if d.mlp:
            block.mlp.fc1, block.mlp.fc2 = nn.Linear(C, d.mlp_dim), nn.Linear(d.mlp_dim, C)
        else:
            block.mlp, block.norm2, block.ls2 = RemovedMlp(), nn.Identity(), nn.Identity()
    state = dict(canonical.state_dict())
    final = state.pop("norm.weight"), state.pop("norm.bias")
    prefix = "fc_norm." if cfg.fc_norm else "norm."
    state[prefix + "weight"], state[prefix + "bias"] = final
    if not isinstance(model.head, nn.Linear):
        state = {k: v for k, v in state.items() if not k.startswith(("head.", "head_dist."))}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if k.startswith("blocks.")]:
        raise ConfigError(f"weights did not map onto timm's {timm_class}: missing {missing[:4]}, "
                          f"unexpected {unexpected[:4]}")
    if timm_pretrained_cfg:
        restored = {k: tuple(v) if isinstance(v, list) else v for k, v in timm_pretrained_cfg.items()}
        model.pretrained_cfg = model.default_cfg = restored
    return model.eval()


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
    if not is_timm_vit(model):
        raise unsupported(f"timm:{name} ({type(model).__name__})")
    try:
        check(model)
    except ConfigError as exc:
        raise ConfigError(f"timm:{name}: {exc}") from None
    return model.eval()


METADATA_KEYS: MetadataKeys = {
    "timm_class": ((str,), True), "timm_global_pool": ((str,), True),
    "timm_num_classes": ((int, type(None)), True), "timm_pretrained_cfg": ((dict, type(None)), False)}


def _check_metadata(meta: dict[str, Any], num_classes: int) -> None:
    check_metadata_keys(meta, METADATA_KEYS)
    count = meta.get("timm_num_classes")
    if count is not None and count not in (0, num_classes):
        raise ModelFileError(f"the model config's 'timm_num_classes' is {count} but the model has "
                             f"{num_classes} classes (0 for a backbone); re-save the model with vitrim.save, "
                             f"which records the family's class and config")


def _rebuild(canonical: VisionTransformer, meta: dict[str, Any]) -> nn.Module:
    return from_canonical(canonical, meta["timm_class"], meta["timm_global_pool"], meta["timm_num_classes"],
                          meta.get("timm_pretrained_cfg"))


FAMILY = register(Family(
    name="timm",
    summary="timm VisionTransformer (timm:vit_*, timm:deit_*)",
    recognizes=is_timm_vit,
    to_canonical=to_canonical,
    from_canonical=_rebuild,
    metadata=timm_metadata,
    check_metadata=_check_metadata,
    head_kind=lambda model: "classifier" if isinstance(model.head, nn.Linear) else "none",
    prunable=WHOLE_HEADS,
    check=check,
    spec_prefix="timm",
    load_spec=create_timm,
    order=20,
))

"""The YOLOS family: ``transformers`` ``YolosForObjectDetection`` <-> the canonical vitrim ViT, weights
and per-layer dims both ways, and pruning by the detector's own Hungarian-matched loss.

YOLOS is a DeiT-style pre-norm ViT whose sequence is ``[class token, patches, detection tokens]``,
each with a learned position embedding, and whose two MLP heads (``class_labels_classifier``,
``bbox_predictor``) read the final detection tokens. Attention is permutation-equivariant, so the
canonical model holds the detection tokens as register tokens right after the class token
(``[class, detection, patches]``, the position rows reordered alike): the same per-token outputs,
and token reduction never drops them. The position embedding is stored for ``config.image_size``
and resized bicubically for other (square) sizes, as YOLOS does (canonical ``pos_embed_grid``).

The detection heads are not pruned and keep the embedding width (``embed`` is not prunable). They
ride in the canonical head: its weight rows are the six head layers' weights stacked (every one
reads ``hidden_size`` inputs), its bias their biases, so slicing, saving and loading carry them
unchanged; the canonical "logits" are not the detector's output — :func:`detect` computes
``(logits, pred_boxes)`` from a canonical model, and :func:`yolos_loss` gives the
``(forward, loss_fn)`` pair :func:`vitrim.prune` takes, the loss being
``YolosForObjectDetection``'s own (``scipy`` for the matcher).

Refused (:func:`check`): mid-layer position embeddings (``use_mid_position_embeddings=True``: a
per-token addition between blocks the canonical ViT has no place for), non-square
``image_size`` or patches, activations other than GELU / tanh-GELU / quick-GELU / SiLU, and head
MLPs of another shape than transformers builds. :func:`square` turns a non-square checkpoint (the
hustvl ones store ``[800, 1333]``) into a square one with the same outputs at its new size.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vitrim.adapters.hf_common import (RemovedAttention, RemovedMlp, check_hf_config, check_one_head_dim,
                                       hf_metadata, hf_metadata_check, require_transformers)
from vitrim.adapters.registry import WHOLE_HEADS, Family, register
from vitrim.errors import ConfigError, DataError, ModelFileError
from vitrim.models import BlockDims, ViTConfig, VisionTransformer

HF_CLASS = "YolosForObjectDetection"
# Hugging Face hidden_act -> canonical mlp_act
ACTIVATIONS = {"gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "quick_gelu": "quick_gelu", "silu": "silu",
               "swish": "silu"}
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SIZE_DEFAULTS = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072,
                 "image_size": 512, "patch_size": 16, "num_channels": 3}
HEADS = ("class_labels_classifier", "bbox_predictor")
PRUNABLE = tuple(s for s in WHOLE_HEADS if s != "embed")  # the detection heads read the embedding width
MID_POSITION_EMBEDDINGS = ("YOLOS with use_mid_position_embeddings=True adds learned position embeddings between "
                           "the layers, which vitrim's ViT cannot express; only use_mid_position_embeddings=False "
                           "converts")


class RemovedSelfAttention(RemovedAttention):
    """A pruned-away YOLOS attention (``YolosAttention`` returns a tensor, not a tuple): adds nothing."""

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:  # type: ignore[override]
        return torch.zeros_like(hidden_states)


class RemovedMlpOutput(RemovedMlp):
    """A pruned-away YOLOS MLP's output layer: the residual stream passes unchanged."""

    def forward(self, hidden_states: torch.Tensor,  # type: ignore[override]
                input_tensor: torch.Tensor) -> torch.Tensor:
        return input_tensor


def recognizes(model: Any) -> bool:
    """True for a live ``transformers`` ``YolosForObjectDetection``."""
    return type(model).__name__ == HF_CLASS and type(model).__module__.startswith("transformers.")


def _side(value: Any, what: str) -> int:
    """The side of a square ``image_size`` / ``patch_size`` (an int or an equal pair)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, (list, tuple)) and len(value) == 2 and value[0] == value[1] and isinstance(value[0], int):
        return value[0]
    fix = ("; vitrim.adapters.families.yolos.square(model, size) stores the position embeddings for a square "
           "size, resized exactly as YOLOS resizes them at that input size") if what == "image_size" else ""
    raise ConfigError(f"YOLOS {what} {value!r} is not square; vitrim converts square images and patches only{fix}")


def image_side(cfg: Any) -> int:
    """The side of the (square) images ``cfg`` stores position embeddings for."""
    return _side(list(cfg.image_size) if isinstance(cfg.image_size, tuple) else cfg.image_size, "image_size")


def check(model: nn.Module) -> None:
    """A :class:`ConfigError` naming what vitrim cannot convert in ``model``."""
    cfg = model.config
    if cfg.use_mid_position_embeddings:
        raise ConfigError(MID_POSITION_EMBEDDINGS)
    if cfg.hidden_act not in ACTIVATIONS:
        raise ConfigError(f"YOLOS hidden_act {cfg.hidden_act!r} is not supported (supported: {', '.join(ACTIVATIONS)})")
    side, patch = image_side(cfg), _side(cfg.patch_size, "patch_size")
    if side % patch:
        raise ConfigError(f"YOLOS image_size {side} is not a multiple of the patch size {patch}")
    if cfg.num_detection_tokens < 1:
        raise ConfigError("YOLOS needs at least one detection token (num_detection_tokens >= 1)")
    C = model.vit.embeddings.cls_token.shape[-1]
    for name, out in zip(HEADS, (cfg.num_labels + 1, 4)):
        widths = [(layer.in_features, layer.out_features) for layer in getattr(model, name).layers]
        if widths != [(C, C), (C, C), (C, out)]:
            raise ConfigError(f"YOLOS {name} has layers {widths}, not the three {C}-wide layers transformers builds")


def square(model: nn.Module, image_size: int) -> nn.Module:
    """A copy of ``model`` (a YOLOS with a non-square ``image_size``, such as the ``[800, 1333]`` of the
    hustvl checkpoints) storing its position embeddings for ``image_size`` x ``image_size`` images,
    resized exactly as YOLOS resizes them at that input size: the same outputs there, and a model
    vitrim converts. At other sizes YOLOS then resizes from the square grid, not the original one."""
    transformers = require_transformers()
    cfg = model.config
    patch = _side(cfg.patch_size, "patch_size")
    if cfg.use_mid_position_embeddings:
        raise ConfigError(MID_POSITION_EMBEDDINGS)
    if image_size % patch:
        raise ConfigError(f"image size {image_size} is not a multiple of the patch size {patch}")
    emb = model.vit.embeddings
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        state["vit.embeddings.position_embeddings"] = emb.interpolation(emb.position_embeddings,
                                                                        (image_size, image_size))
    config = type(cfg).from_dict({**cfg.to_dict(), "image_size": [image_size, image_size]})
    squared = transformers.YolosForObjectDetection(config)
    squared.load_state_dict(state, strict=True)
    return squared.eval()


def head_kind(model: nn.Module) -> str:
    """``"detector"``: the head reads detection tokens; pruned by a task loss (:func:`yolos_loss`) or,
    without one, by the distance to the dense output features."""
    return "detector"


def _layer_dims(layer: nn.Module) -> BlockDims:
    """One YOLOS layer's canonical dims (a removed attention or MLP has none)."""
    has_attn, has_mlp = not isinstance(layer.attention, RemovedAttention), not isinstance(layer.output, RemovedMlp)
    if has_attn:
        a = layer.attention.attention
        dims = dict(heads=a.num_attention_heads, qk_dim=a.attention_head_size, v_dim=a.attention_head_size,
                    attn_scale=float(a.scaling))
    else:
        dims = dict(heads=0, qk_dim=0, v_dim=0, attention=False)
    return BlockDims(mlp_dim=layer.output.dense.in_features if has_mlp else 0, mlp=has_mlp, **dims)


def head_rows(C: int, num_labels: int) -> list[int]:
    """Rows of each detection-head layer in the canonical head, in order: the class MLP's three
    layers, then the box MLP's."""
    return [C, C, num_labels + 1, C, C, 4]


def to_canonical(model: nn.Module, image_size: int | None = None) -> VisionTransformer:
    """The equivalent canonical ViT (a copy). ``image_size``: the square size the model will see
    (default ``config.image_size``); position embeddings are resized to it as YOLOS does."""
    check(model)
    cfg, emb = model.config, model.vit.embeddings
    C, D, patch = emb.cls_token.shape[-1], cfg.num_detection_tokens, _side(cfg.patch_size, "patch_size")
    image_size = image_size or image_side(cfg)
    if image_size % patch:
        raise ConfigError(f"image size {image_size} is not a multiple of the patch size {patch}")
    grid = image_side(cfg) // patch
    canonical_cfg = ViTConfig(
        image_size=image_size, patch_size=patch, in_chans=cfg.num_channels,
        num_classes=sum(head_rows(C, cfg.num_labels)),
        embed_dim=C, blocks=[_layer_dims(layer) for layer in model.vit.encoder.layer], class_token=True,
        reg_tokens=D, pool="cls", qkv_bias=bool(cfg.qkv_bias), norm_eps=float(cfg.layer_norm_eps),
        mlp_act=ACTIVATIONS[cfg.hidden_act], pos_embed_grid=None if grid == image_size // patch else grid,
        mean=IMAGENET_MEAN if cfg.num_channels == 3 else (0.5,) * cfg.num_channels,
        std=IMAGENET_STD if cfg.num_channels == 3 else (0.5,) * cfg.num_channels)
    canonical = VisionTransformer(canonical_cfg)
    canonical.load_state_dict(_to_canonical_state(model), strict=True)
    return canonical.eval()


def _to_canonical_state(model: nn.Module) -> dict[str, torch.Tensor]:
    vit, D = model.vit, model.config.num_detection_tokens
    emb = vit.embeddings
    pos = emb.position_embeddings  # (1, 1 + P + D, C): class, patches, detection tokens
    state = {"patch_embed.proj.weight": emb.patch_embeddings.projection.weight,
             "patch_embed.proj.bias": emb.patch_embeddings.projection.bias,
             "cls_token": emb.cls_token, "reg_token": emb.detection_tokens,
             "pos_embed": torch.cat([pos[:, :1], pos[:, -D:], pos[:, 1:-D]], dim=1),  # class, detection, patches
             "norm.weight": vit.layernorm.weight, "norm.bias": vit.layernorm.bias}
    for i, layer in enumerate(vit.encoder.layer):
        state.update(_layer_state(layer, f"blocks.{i}."))
    layers = [layer for name in HEADS for layer in getattr(model, name).layers]
    state["head.weight"] = torch.cat([layer.weight for layer in layers])
    state["head.bias"] = torch.cat([layer.bias for layer in layers])
    return {k: v.detach().clone() for k, v in state.items()}


def _layer_state(layer: nn.Module, p: str) -> dict[str, torch.Tensor]:
    """Canonical block ``p`` (``"blocks.i."``) from one YOLOS layer; a removed sub-layer has none."""
    state: dict[str, torch.Tensor] = {}
    if not isinstance(layer.attention, RemovedAttention):
        a, out = layer.attention.attention, layer.attention.output.dense
        state[p + "attn.qkv.weight"] = torch.cat([a.query.weight, a.key.weight, a.value.weight])
        if a.query.bias is not None:
            state[p + "attn.qkv.bias"] = torch.cat([a.query.bias, a.key.bias, a.value.bias])
        state[p + "attn.proj.weight"], state[p + "attn.proj.bias"] = out.weight, out.bias
        state[p + "norm1.weight"], state[p + "norm1.bias"] = layer.layernorm_before.weight, layer.layernorm_before.bias
    if not isinstance(layer.output, RemovedMlp):
        fc1, fc2 = layer.intermediate.dense, layer.output.dense
        state[p + "mlp.fc1.weight"], state[p + "mlp.fc1.bias"] = fc1.weight, fc1.bias
        state[p + "mlp.fc2.weight"], state[p + "mlp.fc2.bias"] = fc2.weight, fc2.bias
        state[p + "norm2.weight"], state[p + "norm2.bias"] = layer.layernorm_after.weight, layer.layernorm_after.bias
    return state


def _check_canonical(cfg: ViTConfig, config: Any) -> None:
    """A :class:`ConfigError` unless ``cfg`` holds the detection tokens and heads ``config`` describes."""
    check_one_head_dim(cfg, "YOLOS")
    rows = sum(head_rows(cfg.embed_dim, config.num_labels))
    if cfg.num_classes != rows or cfg.reg_tokens != config.num_detection_tokens:
        raise ConfigError(f"the canonical model ({cfg.embed_dim} wide, {cfg.reg_tokens} register tokens, a "
                          f"{cfg.num_classes}-row head) does not hold this YOLOS's detection tokens and heads "
                          f"({rows} head rows): the embedding width and the head are not prunable")
    if cfg.pool != "cls" or not cfg.class_token or cfg.distill_token or not cfg.pos_embed_prefix:
        raise ConfigError("the canonical model is not one converted from YOLOS (class token, detection tokens as "
                          "registers, cls pooling)")


def from_canonical(canonical: VisionTransformer, meta: dict[str, Any]) -> nn.Module:
    """The ``YolosForObjectDetection`` carrying ``canonical``'s dims and weights."""
    transformers = require_transformers()
    cfg, hf_config = canonical.config, meta["hf_config"]
    if meta["hf_class"] != HF_CLASS:
        raise ConfigError(f"unsupported YOLOS class {meta['hf_class']!r} (supported: {HF_CLASS})")
    side = cfg.stored_grid * cfg.patch_size
    config = transformers.YolosConfig.from_dict({**hf_config, **config_sizes(cfg), "image_size": [side, side]})
    _check_canonical(cfg, config)
    model = transformers.YolosForObjectDetection(config)
    for layer, dims in zip(model.vit.encoder.layer, cfg.blocks):
        _resize_layer(layer, dims, cfg)
    missing, unexpected = model.load_state_dict(_to_hf_state(canonical), strict=False)
    unused = _removed_norms(cfg)
    left = [k for k in missing if k not in unused]
    if unexpected or left:
        raise ConfigError(f"weights did not map onto {HF_CLASS}: missing {left[:5]}, unexpected {unexpected[:5]}")
    return model.eval()


def config_sizes(cfg: ViTConfig) -> dict[str, int]:
    """The ``YolosConfig`` sizes a dimension plan sets: the width and depth always, the head count and
    MLP width when every layer shares them (and the heads are ``hidden_size / num_attention_heads``
    wide); otherwise the dense values stay and the modules carry the per-layer widths."""
    sizes = {"hidden_size": cfg.embed_dim, "num_hidden_layers": cfg.depth}
    attention = {(d.heads, d.qk_dim) for d in cfg.blocks if d.attention}
    if len(attention) == 1 and all(d.attention for d in cfg.blocks):
        (heads, head_dim), = attention
        if heads * head_dim == cfg.embed_dim:
            sizes["num_attention_heads"] = heads
    mlp = {d.mlp_dim for d in cfg.blocks if d.mlp}
    if len(mlp) == 1 and all(d.mlp for d in cfg.blocks):
        sizes["intermediate_size"], = mlp
    return sizes


def _resize_layer(layer: nn.Module, dims: BlockDims, cfg: ViTConfig) -> None:
    """Give one YOLOS layer the canonical block's widths (new linears; removed sub-layers replaced)."""
    C = cfg.embed_dim
    if dims.attention:
        a, width = layer.attention.attention, dims.heads * dims.qk_dim
        a.query, a.key, a.value = (nn.Linear(C, width, bias=cfg.qkv_bias) for _ in range(3))
        layer.attention.output.dense = nn.Linear(width, C)
        a.num_attention_heads, a.attention_head_size, a.all_head_size = dims.heads, dims.qk_dim, width
        a.scaling = dims.scale
    else:
        layer.attention = RemovedSelfAttention()
    if dims.mlp:
        layer.intermediate.dense, layer.output.dense = nn.Linear(C, dims.mlp_dim), nn.Linear(dims.mlp_dim, C)
    else:
        layer.intermediate, layer.output = RemovedMlp(), RemovedMlpOutput()


def _removed_norms(cfg: ViTConfig) -> set[str]:
    """HF names of the LayerNorms in front of removed sub-layers (they stay, unused)."""
    names: set[str] = set()
    for i, d in enumerate(cfg.blocks):
        for present, norm in ((d.attention, "layernorm_before"), (d.mlp, "layernorm_after")):
            if not present:
                names.update(f"vit.encoder.layer.{i}.{norm}.{kind}" for kind in ("weight", "bias"))
    return names


def _to_hf_state(canonical: VisionTransformer) -> dict[str, torch.Tensor]:
    cfg, src = canonical.config, canonical.state_dict()
    D, pos = cfg.reg_tokens, src["pos_embed"]  # (1, 1 + D + P, C): class, detection, patches
    state = {"vit.embeddings.patch_embeddings.projection.weight": src["patch_embed.proj.weight"],
             "vit.embeddings.patch_embeddings.projection.bias": src["patch_embed.proj.bias"],
             "vit.embeddings.cls_token": src["cls_token"], "vit.embeddings.detection_tokens": src["reg_token"],
             "vit.embeddings.position_embeddings": torch.cat([pos[:, :1], pos[:, 1 + D:], pos[:, 1:1 + D]], dim=1),
             "vit.layernorm.weight": src["norm.weight"], "vit.layernorm.bias": src["norm.bias"]}
    for i, d in enumerate(cfg.blocks):
        state.update(_layer_hf_state(src, f"blocks.{i}.", f"vit.encoder.layer.{i}.", d))
    rows = head_rows(cfg.embed_dim, cfg.num_classes - 4 * cfg.embed_dim - 5)
    names = [f"{name}.layers.{j}" for name in HEADS for j in range(3)]
    for name, weight, bias in zip(names, src["head.weight"].split(rows), src["head.bias"].split(rows)):
        state[f"{name}.weight"], state[f"{name}.bias"] = weight, bias
    return state


def _layer_hf_state(src: dict[str, torch.Tensor], p: str, q: str, d: BlockDims) -> dict[str, torch.Tensor]:
    """One YOLOS layer's HF weights (names under ``q``) from canonical block ``p``."""
    state: dict[str, torch.Tensor] = {}
    if d.attention:
        width = d.heads * d.qk_dim
        for kind in ("weight", "bias"):
            if f"{p}attn.qkv.{kind}" in src:
                for proj, tensor in zip(("query", "key", "value"), src[f"{p}attn.qkv.{kind}"].split(width)):
                    state[f"{q}attention.attention.{proj}.{kind}"] = tensor
            state[f"{q}attention.output.dense.{kind}"] = src[f"{p}attn.proj.{kind}"]
            state[f"{q}layernorm_before.{kind}"] = src[f"{p}norm1.{kind}"]
    if d.mlp:
        for kind in ("weight", "bias"):
            state[f"{q}intermediate.dense.{kind}"] = src[f"{p}mlp.fc1.{kind}"]
            state[f"{q}output.dense.{kind}"] = src[f"{p}mlp.fc2.{kind}"]
            state[f"{q}layernorm_after.{kind}"] = src[f"{p}norm2.{kind}"]
    return state


# --- detection outputs and the detector's own loss ------------------------------------------

def detect(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logits (B, D, labels + 1), pred_boxes (B, D, 4))`` of a canonical model converted from YOLOS
    (or a token-reduced view of one, :func:`vitrim.reduce_tokens`: the detection tokens are prefix
    tokens and are never reduced): its detection heads (the canonical head's rows) on the final
    detection tokens."""
    canonical = getattr(model, "model", model)  # a TokenReducedViT wraps the canonical model
    cfg = canonical.config
    C, D = cfg.embed_dim, cfg.reg_tokens
    features = model.forward_features(x)
    tokens = (features[0] if isinstance(features, tuple) else features)[:, 1:1 + D]  # (B, D, C)
    rows = head_rows(C, cfg.num_classes - 4 * C - 5)
    layers = list(zip(canonical.head.weight.split(rows), canonical.head.bias.split(rows)))
    outputs = []
    for mlp in (layers[:3], layers[3:]):
        h = tokens
        for j, (weight, bias) in enumerate(mlp):
            h = F.linear(h, weight, bias)
            h = F.relu(h) if j < 2 else h
        outputs.append(h)
    return outputs[0], outputs[1].sigmoid()  # (B, D, labels + 1), (B, D, 4)


def yolos_targets(target: dict[str, torch.Tensor], height: int, width: int) -> dict[str, torch.Tensor]:
    """A COCO-style target (``boxes`` (K, 4) xyxy in pixels, ``labels`` (K,) 0-based) as YOLOS's
    loss reads it: ``class_labels`` and ``boxes`` (K, 4) as normalised (cx, cy, w, h)."""
    boxes = target["boxes"].float()
    scale = boxes.new_tensor([width, height, width, height])
    x0, y0, x1, y1 = (boxes / scale).unbind(-1)
    cxcywh = torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], dim=-1)  # (K, 4)
    return {"class_labels": target["labels"].long(), "boxes": cxcywh}


def yolos_loss(model: nn.Module, data: Any) -> tuple[Callable[[VisionTransformer, torch.Tensor], Any],
                                                     Callable[[Any, torch.Tensor], torch.Tensor]]:
    """``(forward(canonical, x), loss_fn(output, index))`` for :func:`vitrim.prune`: ``forward`` is
    :func:`detect`; ``loss_fn`` is ``model``'s own Hungarian-matched loss (cross-entropy, L1 and
    GIoU, weighted by its config) per image (B,), image ``index[i]`` of ``data`` (a
    :class:`~vitrim.data.coco.DenseSet`: ``targets`` with ``boxes`` xyxy in pixels and 0-based
    ``labels``, ``images`` (N, C, H, W)). Auxiliary losses are left out (they need the layers' outputs)."""
    if not recognizes(model):
        raise ConfigError(f"yolos_loss needs a {HF_CLASS}, got {type(model).__name__}")
    check(model)
    config = type(model.config).from_dict({**model.config.to_dict(), "auxiliary_loss": False})
    criterion = model.loss_function
    H, W = data.images.shape[-2:]
    index = class_indices(model, data)  # the data's category k is the model's class index[k]
    targets = [yolos_targets({**t, "labels": index[t["labels"].long()]}, H, W) for t in data.targets]

    def loss_fn(output: tuple[torch.Tensor, torch.Tensor], index: torch.Tensor) -> torch.Tensor:
        logits, boxes = output
        losses = []
        for i, j in enumerate(index.tolist()):
            labels = [{k: v.to(logits.device) for k, v in targets[j].items()}]
            losses.append(criterion(logits[i:i + 1], labels, logits.device, boxes[i:i + 1], config)[0])
        return torch.stack(losses)  # (B,)

    return detect, loss_fn


def class_indices(model: nn.Module, data: Any) -> torch.Tensor:
    """For each of ``data``'s categories (``class_names``, 0-based), the class index of ``model`` that
    predicts it: by name through ``config.id2label`` (a COCO checkpoint numbers its 91 classes by
    COCO id), or the same index when the model's labels are unnamed (``LABEL_k``)."""
    names = list(getattr(data, "class_names", ()) or ())
    where = {str(name): int(i) for i, name in (model.config.id2label or {}).items()}
    found = [name for name in names if name in where]
    if found and len(found) < len(names):
        missing = [name for name in names if name not in where]
        raise DataError(f"{getattr(data, 'name', 'the data')}'s categories {missing[:5]} are not among the model's "
                        f"labels (config.id2label); use data with the categories it was trained on")
    if found:
        return torch.tensor([where[name] for name in names], dtype=torch.long)
    if len(names) > model.config.num_labels:
        raise DataError(f"{getattr(data, 'name', 'the data')} has {len(names)} categories but the model predicts "
                        f"{model.config.num_labels} (num_labels); build the detector for the data's categories")
    return torch.arange(len(names))


def normalisation(channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``(mean, std)`` YOLOS's image processor uses: ImageNet's for RGB, 0.5 for other channel counts."""
    return (IMAGENET_MEAN, IMAGENET_STD) if channels == 3 else ((0.5,) * channels, (0.5,) * channels)


@torch.no_grad()
def yolos_detections(model: nn.Module, images: torch.Tensor, top_k: int = 100) -> list[dict[str, torch.Tensor]]:
    """Per image ``boxes`` (n, 4) xyxy in pixels, ``scores`` and 0-based ``labels`` of a
    ``YolosForObjectDetection`` on normalised ``images`` (B, C, H, W): each detection token's most
    likely class other than "no object" (as its image processor's post-processing), the ``top_k``
    highest scores."""
    out = model(pixel_values=images)
    scores, labels = out.logits.softmax(-1)[..., :-1].max(-1)  # (B, D)
    H, W = images.shape[-2:]
    cx, cy, w, h = out.pred_boxes.unbind(-1)  # (B, D) each, normalised
    boxes = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1) * images.new_tensor([W, H, W, H])
    results = []
    for b in range(images.shape[0]):
        order = scores[b].argsort(descending=True)[:top_k]
        results.append({"boxes": boxes[b, order], "scores": scores[b, order], "labels": labels[b, order]})
    return results


def evaluate_yolos(model: nn.Module, data: Any, batch_size: int = 8,
                   device: str | torch.device | None = None) -> dict[str, float]:
    """COCO box metrics (:func:`vitrim.dense.detection.coco_map`) of a ``YolosForObjectDetection`` on
    a :class:`~vitrim.data.coco.DenseSet`, normalised as YOLOS's image processor does; ``device``:
    where it runs (default: where it is)."""
    from dataclasses import replace

    from vitrim.dense.detection import evaluate_detector
    from vitrim.device import module_device, resolve_device

    if not recognizes(model):
        raise ConfigError(f"evaluate_yolos needs a {HF_CLASS}, got {type(model).__name__}")
    index = class_indices(model, data)
    to_data = torch.full((model.config.num_labels + 1,), -1, dtype=torch.long)
    to_data[index] = torch.arange(len(index))  # model class -> the data's category (-1: not in the data)

    def detect(x: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        found = []
        for d in yolos_detections(model, x.to(where)):
            d = {k: v.cpu() for k, v in d.items()}
            labels = to_data[d["labels"]]
            keep = labels >= 0
            found.append({"boxes": d["boxes"][keep], "scores": d["scores"][keep], "labels": labels[keep]})
        return found

    mean, std = normalisation(data.images.shape[1])
    was, training = module_device(model), model.training
    where = was if device is None else resolve_device(device)
    model.to(where).eval()
    try:
        return evaluate_detector(detect, replace(data, mean=mean, std=std), batch_size)
    finally:
        model.to(was).train(training)


def prune_yolos(model: nn.Module, target: str = "flops=0.5", data: Any = None, **options: Any) -> Any:
    """``model`` (a ``YolosForObjectDetection``) pruned to ``target`` of its backbone's cost by its own
    detection loss on ``data`` (a :class:`~vitrim.data.coco.DenseSet`), the detection heads kept;
    returns the :class:`~vitrim.prune.api.PruneResult` (``.model`` is a ``YolosForObjectDetection``).
    ``options`` are :class:`~vitrim.prune.PruneConfig` fields (default: every image calibrates)."""
    from vitrim.data.dataset import ImageSet
    from vitrim.prune import prune

    if data is None or len(data) == 0:
        raise ConfigError("pruning YOLOS by its loss needs detection data (a DenseSet from vitrim.data.coco.load_coco)")
    if "kd" in options.get("recover", "reconstruct"):
        raise ConfigError("distillation matches the canonical logits, which are not the detector's output; use "
                          "--recover reconstruct (recover='reconstruct') or none, and fine-tune the detector afterwards")
    forward, loss_fn = yolos_loss(model, data)
    mean, std = normalisation(data.images.shape[1])
    calib = ImageSet(data.images, torch.arange(len(data)), [str(i) for i in range(len(data))], mean, std,
                     name=getattr(data, "name", "coco"))
    options.setdefault("calib_images", len(data))
    return prune(model, target, data=calib, loss_fn=loss_fn, forward=forward, objective="labels", **options)


# --- config.json ----------------------------------------------------------------------------

def check_config(config: dict[str, Any], source: Any) -> None:
    """Type- and size-check a YOLOS ``config.json`` before transformers builds anything."""
    tokens = config.get("num_detection_tokens", 100)
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1:
        raise ModelFileError(f"{source}: 'num_detection_tokens' must be a positive integer, got {tokens!r}")
    check_hf_config(config, source, defaults=SIZE_DEFAULTS, num_prefix_tokens=1 + tokens)


def infer_class(config: dict[str, Any], names: list[str]) -> str:
    """The class a ``config.json`` without ``architectures`` describes: the detector, if the weights
    hold its heads."""
    if any(n.startswith("class_labels_classifier.") for n in names):
        return HF_CLASS
    raise ConfigError(f"the YOLOS weights hold no detection heads (a YolosModel backbone); vitrim converts "
                      f"{HF_CLASS} only")


FAMILY = register(Family(
    name="hf-yolos",
    summary="Hugging Face YOLOS (YolosForObjectDetection, use_mid_position_embeddings=False)",
    recognizes=recognizes,
    to_canonical=to_canonical,
    from_canonical=from_canonical,
    metadata=hf_metadata,
    check_metadata=hf_metadata_check(check_config),
    head_kind=head_kind,
    prunable=PRUNABLE,
    token_reduction="drop, evit, tome on the canonical model, read with yolos.detect (detection tokens are never "
                    "reduced)",
    onnx=False,
    hf_classes=(HF_CLASS,),
    hf_model_types=("yolos",),
    hf_config_class=lambda hf_class: "YolosConfig",
    hf_infer_class=infer_class,
    hf_check_config=check_config,
    check=check,
    order=60,
))

"""Multiplicative gates on every prunable structure of the canonical ViT, installed with hooks.

Gate keys and shapes (per block ``i``): ``i.heads`` (H,), ``i.qk`` (H, qk), ``i.v`` (H, v),
``i.mlp`` (M,), ``i.attn_layer`` (), ``i.mlp_layer`` (), and ``embed`` (C,) for the residual
width. A gate tensor may carry a leading batch axis (one gate per sample) or not (shared).
A gate of 0 reproduces the sliced model exactly: the residual stream is masked, and every
LayerNorm computes its statistics over the kept channels only.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from vitrim.models import VisionTransformer
from vitrim.models.config import ViTConfig

KINDS = ("heads", "qk", "v", "mlp", "embed", "attn_layer", "mlp_layer")


def gate_shapes(cfg: ViTConfig) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {"embed": (cfg.embed_dim,)}
    for i, d in enumerate(cfg.blocks):
        if d.attention:
            shapes.update({f"{i}.heads": (d.heads,), f"{i}.qk": (d.heads, d.qk_dim),
                           f"{i}.v": (d.heads, d.v_dim), f"{i}.attn_layer": ()})
        if d.mlp:
            shapes.update({f"{i}.mlp": (d.mlp_dim,), f"{i}.mlp_layer": ()})
    return shapes


def kind_of(key: str) -> str:
    return key.rsplit(".", 1)[-1]


def _per_sample(g: torch.Tensor, shape_ndim: int) -> torch.Tensor:
    """(*shape) or (B, *shape) -> (B or 1, *shape)."""
    return g.unsqueeze(0) if g.ndim == shape_ndim else g


def masked_layer_norm(x: torch.Tensor, g: torch.Tensor, norm: nn.LayerNorm) -> torch.Tensor:
    """LayerNorm over the channels weighted by ``g`` (B|1, 1, C); output masked by ``g``."""
    if x.ndim == 2:  # a pooled (B, C) vector (fc_norm)
        g = g[:, 0]
    denom = g.sum(-1, keepdim=True)
    mean = (x * g).sum(-1, keepdim=True) / denom
    var = (g * (x - mean) ** 2).sum(-1, keepdim=True) / denom
    y = (x - mean) * torch.rsqrt(var + norm.eps)
    return (y * norm.weight + norm.bias) * g


@contextlib.contextmanager
def gated(model: VisionTransformer, gates: dict[str, torch.Tensor]) -> Iterator[None]:
    """Run ``model`` with the given gates applied (missing keys mean "all ones")."""
    shapes = gate_shapes(model.config)
    unknown = sorted(set(gates) - set(shapes))
    if unknown:
        raise KeyError(f"unknown gates {unknown}")

    def get(key: str, trailing: int) -> torch.Tensor | None:
        """Gate ``key`` as (B|1, 1 (tokens), *shape) ready to broadcast, or None."""
        if key not in gates:
            return None
        g = _per_sample(gates[key], len(shapes[key]))
        return g.unsqueeze(1)

    embed = get("embed", 1)  # (B|1, 1, C)
    handles = []
    patched_norms: list[nn.LayerNorm] = []

    def mask_residual(out: torch.Tensor, layer_key: str) -> torch.Tensor:
        layer = get(layer_key, 0)
        if layer is not None:
            out = out * layer.view(-1, 1, 1)
        return out * embed if embed is not None else out

    for i, block in enumerate(model.blocks):
        dims = model.config.blocks[i]
        if block.attn is not None:
            H, qk, v = dims.heads, dims.qk_dim, dims.v_dim

            def qkv_hook(mod, inp, out, i=i, H=H, qk=qk):
                g = get(f"{i}.qk", 2)
                if g is None:
                    return out
                q, rest = out.split([H * qk, out.shape[-1] - H * qk], dim=-1)
                return torch.cat([q * g.reshape(g.shape[0], 1, H * qk), rest], dim=-1)

            def proj_pre(mod, args, i=i, H=H, v=v):
                (x,) = args  # (B, N, H*v)
                heads, vg = get(f"{i}.heads", 1), get(f"{i}.v", 2)
                scale = torch.ones(1, 1, H, v, dtype=x.dtype, device=x.device)
                if heads is not None:
                    scale = scale * heads.unsqueeze(-1)
                if vg is not None:
                    scale = scale * vg
                return (x * scale.reshape(scale.shape[0], 1, H * v),)

            handles.append(block.attn.qkv.register_forward_hook(qkv_hook))
            handles.append(block.attn.proj.register_forward_pre_hook(proj_pre))
            handles.append(block.attn.proj.register_forward_hook(
                lambda mod, inp, out, i=i: mask_residual(out, f"{i}.attn_layer")))
        if block.mlp is not None:
            def fc2_pre(mod, args, i=i):
                g = get(f"{i}.mlp", 1)
                return args if g is None else (args[0] * g,)

            handles.append(block.mlp.fc2.register_forward_pre_hook(fc2_pre))
            handles.append(block.mlp.fc2.register_forward_hook(
                lambda mod, inp, out, i=i: mask_residual(out, f"{i}.mlp_layer")))
    if embed is not None:
        handles.append(model.blocks[0].register_forward_pre_hook(lambda mod, args: (args[0] * embed,)))
        residual_norms = [model.norm] + [n for b in model.blocks for n in (b.norm1, b.norm2) if n is not None]
        if model.norm_pre is not None:
            residual_norms.append(model.norm_pre)
        pool = model.attn_pool
        if pool is not None:  # its probe, output and MLP live in the embedding width too
            residual_norms.append(pool.norm)
            handles.append(pool.q.register_forward_pre_hook(lambda mod, args: (args[0] * embed,)))
            for layer in (pool.proj, pool.mlp.fc2):
                handles.append(layer.register_forward_hook(lambda mod, inp, out: out * embed))
        for norm in residual_norms:
            norm.forward = (lambda x, norm=norm: masked_layer_norm(x, embed, norm))  # type: ignore[method-assign]
            patched_norms.append(norm)
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        for norm in patched_norms:
            del norm.forward


def plan_gates(model: VisionTransformer, plan) -> dict[str, torch.Tensor]:
    """0/1 gates that switch off exactly what ``plan`` removes (for checking surgery)."""
    cfg = model.config
    device = next(model.parameters()).device
    gates: dict[str, torch.Tensor] = {}
    embed = torch.zeros(cfg.embed_dim, device=device)
    embed[plan.embed] = 1
    gates["embed"] = embed
    for i, (bp, d) in enumerate(zip(plan.blocks, cfg.blocks)):
        if d.attention:
            heads = torch.zeros(d.heads, device=device)
            qk, v = torch.zeros(d.heads, d.qk_dim, device=device), torch.zeros(d.heads, d.v_dim, device=device)
            for h, qc, vc in zip(bp.heads, bp.qk, bp.v):
                heads[h] = 1
                qk[h, qc] = 1
                v[h, vc] = 1
            gates.update({f"{i}.heads": heads, f"{i}.qk": qk, f"{i}.v": v,
                          f"{i}.attn_layer": torch.tensor(float(bp.attention), device=device)})
        if d.mlp:
            mlp = torch.zeros(d.mlp_dim, device=device)
            mlp[bp.mlp] = 1
            gates.update({f"{i}.mlp": mlp, f"{i}.mlp_layer": torch.tensor(float(bp.mlp_on), device=device)})
    return gates


__all__ = ["KINDS", "gate_shapes", "gated", "kind_of", "masked_layer_norm", "plan_gates"]

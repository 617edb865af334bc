"""Token-reduction primitives: pure functions over token tensors, no model knowledge.

Shapes: ``x`` (B, N, C) tokens with ``prefix`` protected tokens first (class token);
``sizes`` (B, N) how many original patches each token stands for (merging makes them > 1);
``valid`` (B, N) bool, False for padding in per-image (dynamic) mode. Every reduction also
returns ``dest`` (B, N): where each old token went in the new sequence (its own slot, the token
it was fused or merged into), or -1 when it was dropped outright — enough to restore the grid.
"""

from __future__ import annotations

import torch


def class_attention(q: torch.Tensor, k: torch.Tensor, scale: float, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Attention the class token pays to every token, averaged over heads: (B, N).

    ``q``, ``k``: (B, H, N, d); ``bias``: additive logits (B, 1, 1, N) or None.
    Only the class query is used, so the fused attention kernel stays in use for the block itself.
    """
    logits = q[:, :, :1] @ k.transpose(-2, -1) * scale  # (B, H, 1, N)
    if bias is not None:
        logits = logits + bias
    return logits.softmax(dim=-1).mean(dim=1)[:, 0]  # (B, N)


def gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x (B, N, C), index (B, K) -> (B, K, C)."""
    return x.gather(1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def top_patches(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Indices (B, keep) of the highest-scoring patches, in their original order."""
    index = scores.topk(keep, dim=1).indices
    return index.sort(dim=1).values


def prefix_dest(B: int, N: int, prefix: int) -> torch.Tensor:
    """(B, N) destinations: prefix tokens stay in place, the rest start as dropped (-1)."""
    dest = torch.full((B, N), -1, dtype=torch.long)
    dest[:, :prefix] = torch.arange(prefix)
    return dest


def drop_tokens(x: torch.Tensor, sizes: torch.Tensor, scores: torch.Tensor, keep: int, prefix: int,
                fuse: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keep the ``keep`` most-attended patch tokens; with ``fuse``, add one token that is the
    attention-weighted average of the dropped ones (EViT). Returns (tokens, sizes, dest)."""
    patches, patch_sizes = x[:, prefix:], sizes[:, prefix:]
    patch_scores = scores[:, prefix:]
    index = top_patches(patch_scores, keep)  # (B, keep)
    kept = gather_tokens(patches, index)
    kept_sizes = patch_sizes.gather(1, index)
    parts, size_parts = [x[:, :prefix], kept], [sizes[:, :prefix], kept_sizes]
    B, N, _ = x.shape
    dest = prefix_dest(B, N, prefix)
    if fuse and keep < patches.shape[1]:
        dropped = torch.ones_like(patch_scores, dtype=torch.bool).scatter(1, index, False)  # (B, P)
        weights = patch_scores * dropped  # (B, P)
        fused = (weights.unsqueeze(-1) * patches).sum(1, keepdim=True) / weights.sum(1, keepdim=True).clamp_min(1e-12).unsqueeze(-1)
        parts.append(fused)
        size_parts.append((patch_sizes * dropped).sum(1, keepdim=True))
        dest[:, prefix:] = prefix + keep  # the fused token, unless kept below
    dest[:, prefix:] = dest[:, prefix:].scatter(1, index, prefix + torch.arange(keep).expand(B, -1))
    return torch.cat(parts, dim=1), torch.cat(size_parts, dim=1), dest


def bipartite_merge(x: torch.Tensor, metric: torch.Tensor, sizes: torch.Tensor, r: int,
                    prefix: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Bipartite soft matching (Bolya et al., "Token Merging"): merge the ``r`` most similar
    (alternate-position) token pairs by size-weighted averaging. ``metric``: (B, N, d), e.g. keys
    averaged over heads. Prefix tokens are never merged. Returns (tokens, sizes, dest)."""
    B, N, C = x.shape
    r = min(r, (N - prefix) // 2)
    if r <= 0:
        return x, sizes, torch.arange(N).expand(B, -1)
    m = metric[:, prefix:] / metric[:, prefix:].norm(dim=-1, keepdim=True).clamp_min(1e-12)
    a, b = m[:, ::2], m[:, 1::2]  # (B, Na, d), (B, Nb, d)
    similarity = a @ b.transpose(-2, -1)  # (B, Na, Nb)
    best, best_dst = similarity.max(dim=-1)  # (B, Na)
    order = best.argsort(dim=-1, descending=True)
    src, keep_a = order[:, :r], order[:, r:].sort(dim=-1).values  # (B, r), (B, Na - r)
    dst = best_dst.gather(1, src)  # (B, r)
    patches, psizes = x[:, prefix:], sizes[:, prefix:]
    xa, xb = patches[:, ::2], patches[:, 1::2]
    sa, sb = psizes[:, ::2], psizes[:, 1::2]
    weighted_b = xb * sb.unsqueeze(-1)
    weighted_b = weighted_b.scatter_add(1, dst.unsqueeze(-1).expand(-1, -1, C),
                                        gather_tokens(xa * sa.unsqueeze(-1), src))
    new_sb = sb.scatter_add(1, dst, sa.gather(1, src))
    merged_b = weighted_b / new_sb.unsqueeze(-1)
    tokens = torch.cat([x[:, :prefix], gather_tokens(xa, keep_a), merged_b], dim=1)
    new_sizes = torch.cat([sizes[:, :prefix], sa.gather(1, keep_a), new_sb], dim=1)
    Na, Nb = xa.shape[1], xb.shape[1]
    base_b = prefix + Na - r
    dest_a = torch.empty(B, Na, dtype=torch.long)
    dest_a.scatter_(1, keep_a, prefix + torch.arange(Na - r).expand(B, -1))
    dest_a.scatter_(1, src, base_b + dst)
    dest = prefix_dest(B, N, prefix)
    dest[:, prefix::2] = dest_a
    dest[:, prefix + 1::2] = base_b + torch.arange(Nb).expand(B, -1)
    return tokens, new_sizes, dest


def mass_counts(scores: torch.Tensor, tau: float, prefix: int, minimum: int = 1) -> torch.Tensor:
    """Per image, the fewest patches whose share of the class attention reaches ``tau``: (B,)."""
    patch = scores[:, prefix:]
    share = patch / patch.sum(dim=1, keepdim=True).clamp_min(1e-12)
    cumulative = share.sort(dim=1, descending=True).values.cumsum(dim=1)
    counts = (cumulative < tau - 1e-9).sum(dim=1) + 1
    return counts.clamp(min=minimum, max=patch.shape[1])

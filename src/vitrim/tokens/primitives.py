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


def identity_dest(B: int, N: int, device: torch.device | None = None) -> torch.Tensor:
    """(B, N) destinations when nothing is reduced: every token stays in its slot."""
    return torch.arange(N, device=device).expand(B, -1)


def prefix_dest(B: int, N: int, prefix: int, device: torch.device | None = None) -> torch.Tensor:
    """(B, N) destinations: prefix tokens stay in place, the rest start as dropped (-1)."""
    dest = torch.full((B, N), -1, dtype=torch.long, device=device)
    dest[:, :prefix] = torch.arange(prefix, device=device)
    return dest


def fuse_tokens(patches: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """EViT's fused token: the ``weights``-weighted average of ``patches`` (B, P, C), weights
    (B, P) zero for the tokens that stay. Returns (fused (B, 1, C), total weight (B, 1))."""
    total = weights.sum(1, keepdim=True)  # (B, 1)
    fused = (weights.unsqueeze(-1) * patches).sum(1, keepdim=True) / total.clamp_min(1e-12).unsqueeze(-1)
    return fused, total


def drop_tokens(x: torch.Tensor, sizes: torch.Tensor, scores: torch.Tensor, keep: int, prefix: int,
                fuse: bool = False, need_dest: bool = True
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Keep the ``keep`` most-attended patch tokens; with ``fuse``, add one token that is the
    attention-weighted average of the dropped ones (EViT). Returns (tokens, sizes, dest) —
    ``dest`` is None when not ``need_dest``."""
    patches, patch_sizes = x[:, prefix:], sizes[:, prefix:]
    patch_scores = scores[:, prefix:]
    index = top_patches(patch_scores, keep)  # (B, keep)
    kept = gather_tokens(patches, index)
    kept_sizes = patch_sizes.gather(1, index)
    parts, size_parts = [x[:, :prefix], kept], [sizes[:, :prefix], kept_sizes]
    fused = fuse and keep < patches.shape[1]
    if fused:
        dropped = torch.ones_like(patch_scores, dtype=torch.bool).scatter(1, index, torch.zeros_like(index, dtype=torch.bool))  # (B, P)
        parts.append(fuse_tokens(patches, patch_scores * dropped)[0])
        size_parts.append((patch_sizes * dropped).sum(1, keepdim=True))
    tokens, new_sizes = torch.cat(parts, dim=1), torch.cat(size_parts, dim=1)
    if not need_dest:
        return tokens, new_sizes, None
    B, N, _ = x.shape
    dest = prefix_dest(B, N, prefix, x.device)
    if fused:
        dest[:, prefix:] = prefix + keep  # the fused token, unless kept below
    dest[:, prefix:] = dest[:, prefix:].scatter(1, index, prefix + torch.arange(keep, device=x.device).expand(B, -1))
    return tokens, new_sizes, dest


def bipartite_merge(x: torch.Tensor, metric: torch.Tensor, sizes: torch.Tensor, r: int, prefix: int, *,
                    threshold: float | None = None, valid: torch.Tensor | None = None, need_dest: bool = True
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Bipartite soft matching (Bolya et al., "Token Merging"): merge the most similar
    (alternate-position) token pairs by size-weighted averaging. ``metric``: (B, N, d), e.g. keys
    averaged over heads. Prefix tokens are never merged.

    Without ``threshold``, every image merges its ``r`` most similar pairs. With it, each image
    merges the pairs whose cosine similarity exceeds ``threshold`` (at most ``r``): images with
    much redundant content (plain background) merge more; the batch is padded to its largest
    count. ``valid`` marks padding from an earlier per-image step, which never merges (its
    ``dest`` is -1).
    Returns (tokens, sizes, dest, valid) — ``valid`` is None when nothing is padded, ``dest``
    when not ``need_dest`` (it costs a dozen small ops, a visible share at batch 1).
    """
    B, N, C = x.shape
    r = min(r, (N - prefix) // 2)
    if r <= 0:
        if not need_dest:
            return x, sizes, None, valid
        dest = identity_dest(B, N, x.device)
        return x, sizes, dest if valid is None else dest.masked_fill(~valid, -1), valid
    m = metric[:, prefix:] / metric[:, prefix:].norm(dim=-1, keepdim=True).clamp_min(1e-12)
    a, b = m[:, ::2], m[:, 1::2]  # (B, Na, d), (B, Nb, d)
    similarity = (a @ b.transpose(-2, -1)).clamp(max=1.0)  # (B, Na, Nb)
    if valid is not None:
        similarity = similarity.masked_fill(~valid[:, prefix + 1::2].unsqueeze(1), float("-inf"))
    best, best_dst = similarity.max(dim=-1)  # (B, Na)
    if valid is not None:
        best = best.masked_fill(~valid[:, prefix::2], float("-inf"))
    order = best.argsort(dim=-1, descending=True)  # (B, Na)
    Na, Nb = a.shape[1], b.shape[1]
    rank = order.argsort(dim=-1)  # (B, Na): place of each a-token in the order
    if threshold is None:  # a count known before the call: no data-dependent size (exportable)
        fewest = r
        merged = rank < r  # (B, Na)
    else:
        counts = (best > threshold).sum(dim=1).clamp(max=r)  # (B,)
        fewest = int(counts.min())
        merged = rank < counts.unsqueeze(1)  # (B, Na)
    keep_a = order[:, fewest:].sort(dim=-1).values  # (B, Na - fewest): kept, or padding left by a merge
    patches, psizes = x[:, prefix:], sizes[:, prefix:]
    xa, xb = patches[:, ::2], patches[:, 1::2]
    sa, sb = psizes[:, ::2], psizes[:, 1::2]
    moving = sa * merged  # (B, Na): the size each a-token moves to its match
    weighted_b = (xb * sb.unsqueeze(-1)).scatter_add(1, best_dst.unsqueeze(-1).expand(-1, -1, C),
                                                    xa * moving.unsqueeze(-1))
    new_sb = sb.scatter_add(1, best_dst, moving)
    merged_b = weighted_b / new_sb.clamp_min(1e-12).unsqueeze(-1)
    stays = ~merged.gather(1, keep_a)  # (B, Na - fewest)
    tokens = torch.cat([x[:, :prefix], gather_tokens(xa, keep_a), merged_b], dim=1)
    new_sizes = torch.cat([sizes[:, :prefix], sa.gather(1, keep_a) * stays, new_sb], dim=1)
    new_valid = None
    if valid is not None or threshold is not None:
        old = valid if valid is not None else torch.ones(B, N, dtype=torch.bool, device=x.device)
        new_valid = torch.cat([old[:, :prefix], stays & old[:, prefix::2].gather(1, keep_a), old[:, prefix + 1::2]], 1)
    if not need_dest:
        return tokens, new_sizes, None, new_valid
    base_b = prefix + Na - fewest
    slot_a = torch.full((B, Na), -1, dtype=torch.long, device=x.device).scatter_(
        1, keep_a, prefix + torch.arange(Na - fewest, device=x.device).expand(B, -1))
    dest = prefix_dest(B, N, prefix, x.device)
    dest[:, prefix::2] = torch.where(merged, base_b + best_dst, slot_a)
    dest[:, prefix + 1::2] = base_b + torch.arange(Nb, device=x.device).expand(B, -1)
    if valid is not None:
        dest = dest.masked_fill(~valid, -1)
    return tokens, new_sizes, dest, new_valid


def mass_counts(scores: torch.Tensor, tau: float, prefix: int, minimum: int = 1) -> torch.Tensor:
    """Per image, the fewest patches whose share of the class attention reaches ``tau``: (B,)."""
    patch = scores[:, prefix:]
    share = patch / patch.sum(dim=1, keepdim=True).clamp_min(1e-12)
    cumulative = share.sort(dim=1, descending=True).values.cumsum(dim=1)
    counts = (cumulative < tau - 1e-9).sum(dim=1) + 1
    return counts.clamp(min=minimum, max=patch.shape[1])

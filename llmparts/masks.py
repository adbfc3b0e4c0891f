"""Attention masks as predicates over absolute positions — the one place the convention lives.

Key j is visible from query i when ``0 <= j <= i`` and, for a sliding window of W,
``i - W < j``: exactly W keys including the query itself (transformers' convention).
Slots that hold no token carry position -1 and are never visible. A padding query (position -1)
sees every key, which keeps its softmax finite; its output is meaningless and never used.
"""

from __future__ import annotations

import torch


def visible(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """Boolean mask (B, 1, T, S), True where query t may attend to key s.

    Args:
        q_pos: (B, T) absolute positions of the queries, -1 for padding.
        k_pos: (B, S) absolute positions of the keys, -1 for empty or padding slots.
        window: sliding window W (W visible keys including the query), or None for full causal.
    """
    qp = q_pos[:, None, :, None]
    kp = k_pos[:, None, None, :]
    mask = (kp >= 0) & (kp <= qp)
    if window is not None:
        mask &= kp > qp - window
    return mask | (qp < 0)

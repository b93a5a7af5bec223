"""Loss functions of the segmenters (model code: no training-loop imports).

Targets are BxHxW int64 in the sampled index space of a batch (0 = background, ``j + 1`` = the
``j``-th sampled class) with :data:`IGNORE` for pixels not scored.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100
"""Ignore value of remapped training targets (torch's cross-entropy default)."""


def pixel_loss(logits: torch.Tensor, target: torch.Tensor, bg_weight: float) -> torch.Tensor:
    """Cross-entropy of Bx(1+K)xHxW logits against BxHxW targets (``IGNORE`` skipped), the
    background class weighted by ``bg_weight``. Zero when every pixel is ignored."""
    if not (target != IGNORE).any():
        return logits.sum() * 0.0
    weight = torch.ones(logits.shape[1], device=logits.device)
    weight[0] = bg_weight
    return F.cross_entropy(logits, target, weight=weight, ignore_index=IGNORE)


def hinge_cos(g_pos: torch.Tensor, g_neg: torch.Tensor) -> torch.Tensor:
    """The paper's counterfactual loss: mean over the batch of max(0, cos(g_pos, g_neg)) for
    BxE embeddings; 0 for orthogonal or opposite pairs, up to 1 for aligned ones."""
    return F.cosine_similarity(g_pos, g_neg, dim=-1).clamp_min(0).mean()


def text_margin(
    g_pos: torch.Tensor,
    g_neg: torch.Tensor,
    text: torch.Tensor,
    valid: torch.Tensor,
    margin: float,
) -> torch.Tensor:
    """max(0, margin - cos(g_pos, t) + cos(g_neg, t)) averaged over the valid (image, class)
    pairs. ``g_*``: BxE; ``text``: BxJxE class embeddings; ``valid``: BxJ bool."""
    gp = F.normalize(g_pos, dim=-1).unsqueeze(1)
    gn = F.normalize(g_neg, dim=-1).unsqueeze(1)
    t = F.normalize(text, dim=-1)
    gap = (gp * t).sum(-1) - (gn * t).sum(-1)
    loss = (margin - gap).clamp_min(0)
    return (loss * valid).sum() / valid.sum().clamp_min(1)

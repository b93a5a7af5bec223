"""Loss functions of the segmenters (model code: no training-loop imports).

Targets are BxHxW int64 in the sampled index space of a batch (0 = background, ``j + 1`` = the
``j``-th sampled class) with :data:`IGNORE` for pixels not scored.

Every loss here is a sum over this process's items divided by a normaliser averaged over the
processes (:func:`process_mean`), so that the mean over N processes of their losses (what DDP's
gradient averaging computes) equals one process's loss on the whole batch: N processes train
the same model as one.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from magicseg.core.errors import ConfigError

IGNORE = -100
"""Ignore value of remapped training targets (torch's cross-entropy default)."""


def world_size() -> int:
    """Processes of the initialised ``torch.distributed`` group (1 without one)."""
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def process_mean(total: torch.Tensor, count: torch.Tensor | float) -> torch.Tensor:
    """``total / mean_over_processes(count)``: this process's share of sum(total) / sum(count)
    over all processes (what averaging the processes' results gives back). ``count`` carries
    no gradient; a zero overall count gives ``total * 0``."""
    count = torch.as_tensor(count, dtype=torch.float32, device=total.device).detach()
    if world_size() > 1:
        import torch.distributed as dist

        count = count.clone()
        dist.all_reduce(count)
        count = count / world_size()
    if float(count) <= 0:
        return total * 0.0
    return total / count


def pixel_loss(logits: torch.Tensor, target: torch.Tensor, bg_weight: float) -> torch.Tensor:
    """Cross-entropy of Bx(1+K)xHxW logits against BxHxW targets (``IGNORE`` skipped), the
    background class weighted by ``bg_weight``: the weighted sum over valid pixels divided by
    their summed weights (all processes together). Zero when every pixel is ignored."""
    weight = torch.ones(logits.shape[1], device=logits.device)
    weight[0] = bg_weight
    total = F.cross_entropy(
        logits.float(), target, weight=weight, ignore_index=IGNORE, reduction="sum"
    )
    valid = target != IGNORE
    norm = torch.where(target[valid] == 0, bg_weight, 1.0).sum()
    return process_mean(total, norm)


def hinge_cos(g_pos: torch.Tensor, g_neg: torch.Tensor) -> torch.Tensor:
    """The paper's counterfactual loss: mean over the batch of max(0, cos(g_pos, g_neg)) for
    BxE embeddings; 0 for orthogonal or opposite pairs, up to 1 for aligned ones."""
    cos = F.cosine_similarity(g_pos.float(), g_neg.float(), dim=-1).clamp_min(0)
    return process_mean(cos.sum(), cos.shape[0])


def text_margin(
    g_pos: torch.Tensor,
    g_neg: torch.Tensor,
    text: torch.Tensor,
    valid: torch.Tensor,
    margin: float,
) -> torch.Tensor:
    """max(0, margin - cos(g_pos, t) + cos(g_neg, t)) averaged over the valid (image, class)
    pairs. ``g_*``: BxE; ``text``: BxJxE class embeddings; ``valid``: BxJ bool."""
    gp = F.normalize(g_pos.float(), dim=-1).unsqueeze(1)
    gn = F.normalize(g_neg.float(), dim=-1).unsqueeze(1)
    t = F.normalize(text.float(), dim=-1)
    gap = (gp * t).sum(-1) - (gn * t).sum(-1)
    loss = (margin - gap).clamp_min(0)
    return process_mean((loss * valid).sum(), valid.sum())


def embedding_cf_loss(
    kind: str,
    g_pos: torch.Tensor,
    g_cf: torch.Tensor,
    pixels_pos: torch.Tensor,
    pixels_cf: Callable[[], torch.Tensor],
    text: torch.Tensor,
    own: torch.Tensor,
    margin: float,
) -> torch.Tensor:
    """The counterfactual losses on embeddings (``train.cf_loss``), shared by the segmenters:
    ``hinge_head`` on the global embeddings ``g_*`` (BxE, positives with a counterfactual and
    their counterfactuals), ``hinge_pixels`` on the mean pixel features (``pixels_pos`` BxE,
    ``pixels_cf`` computed only for this kind), ``text_margin`` against the own classes' text
    embeddings ``text`` (BxJxE, ``own`` BxJ bool)."""
    if kind == "hinge_head":
        return hinge_cos(g_pos, g_cf)
    if kind == "hinge_pixels":
        return hinge_cos(pixels_pos, pixels_cf())
    if kind == "text_margin":
        if g_pos.shape[-1] != text.shape[-1]:
            raise ConfigError(
                "train.cf_loss: text_margin needs class features in CLIP's joint space "
                f"({g_pos.shape[-1]}-d), got {text.shape[-1]}-d"
            )
        return text_margin(g_pos, g_cf, text, own, margin)
    raise ConfigError(f"train.cf_loss: unknown {kind!r}")


def parts(total: torch.Tensor, pix: torch.Tensor, cf: torch.Tensor) -> dict[str, float]:
    """The loss and its parts as floats (for logs)."""
    return {"loss": total.item(), "pixel_loss": pix.item(), "cf_loss": cf.item()}

"""The published ZegCLIP ATM decoder and its loss (``train.clip.decoder: atm``).

A re-implementation, written from reading the code the MagicSeg authors published with the
paper (their copy of ZegCLIP, MIT: ``models/decode_heads/decode_seg.py::ATMSingleHeadSeg``,
``models/losses/atm_loss.py::SegLossPlus``, ``models/losses/criterion.py::SegPlusCriterion``,
config ``configs/magicseg/vpt_seg_fully_vit-b_512x512_20k_12_10.py``). Where that code is broken
or ambiguous, what was taken as the intent is listed in the README, "Departures from the
published code".

Shapes (``B`` images, ``K`` classes, ``N = h*w`` patches, ``D`` = the decoder width = ``T``,
CLIP's joint dim: the published config has ``use_proj=False``, so nothing maps the CLIP
features to another width):

    memory  BxNxD  the last ViT layer's patch tokens, post-LN, through CLIP's visual
                   projection, L2-normalised (the backbone's ``visual_embedding``)
    cls     BxD    the CLS token, post-LN, projected, L2-normalised (the CLIP image embedding)
    text    BxKxD  the class text embeddings, L2-normalised
    queries BxKxD  = Linear_2D->D([cls * text_k, text_k])     (the relationship descriptor)
    ``layers`` x decoder layer (post-LN, no self-attention, dropout 0.1):
        q = LN(q + Drop(CrossAttention(q, memory)))
        q = LN(q + Drop(Linear_4D->D(Drop(ReLU(Linear_D->4D(q))))))
        CrossAttention: ``heads`` heads, q/k/v/output Linear with bias, dropout 0.1 on the
        softmax; its logits q.k / sqrt(D / heads) *before* the softmax, averaged over the
        heads, are the layer's mask logits: BxKxN -> BxKxhxw
    output  the last layer's mask logits, bilinearly upsampled to the image: one sigmoid mask
            per class (the earlier layers' masks are auxiliary outputs).

Loss (:func:`seg_loss_plus`, SegLossPlus with the published weights 100 / 1): no matching (the
class queries are the classes), no classification term; on the sigmoid masks of every class
scored: ``mask_weight`` x sigmoid focal (alpha 0.25, gamma 2; mean over pixels, summed over
images and classes) + ``dice_weight`` x dice over the classes present in each image, both
divided by the number of (image, present class) pairs. Published: on the last layer only.

Background: the published model has none (its dataset maps background to the ignore label,
which the focal term still counts as a negative for every class). Here a background pixel is a
negative for every class, an ignore pixel is left out, and the segmenter's background channel
is the constant logit 0, the sigmoid's decision boundary: a pixel is background when no class
mask fires (see :class:`magicseg.model.clip.ClipSegmenter`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from magicseg.core.errors import ConfigError

FOCAL_ALPHA = 0.25
FOCAL_GAMMA = 2.0
DROPOUT = 0.1
"""Dropout of the published decoder layers (torch's ``TransformerDecoderLayer`` default and the
attention's ``attn_drop``)."""


class MaskCrossAttention(nn.Module):
    """Multi-head cross-attention that also returns its logits.

    ``forward(x, memory)``: ``x`` BxKxD queries, ``memory`` BxNxD -> (BxKxD output, BxKxN
    logits q.k / sqrt(D / heads) before the softmax, averaged over the heads).
    """

    def __init__(self, dim: int, heads: int, attn_drop: float = DROPOUT) -> None:
        super().__init__()
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)
        self.attn_drop = nn.Dropout(attn_drop)

    def forward(self, x: torch.Tensor, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, k, d = x.shape
        n, h = memory.shape[1], self.heads
        q = self.q(x).view(b, k, h, d // h).transpose(1, 2)  # BxHxKxd
        key = self.k(memory).view(b, n, h, d // h).transpose(1, 2)  # BxHxNxd
        v = self.v(memory).view(b, n, h, d // h).transpose(1, 2)
        logits = (q @ key.transpose(-2, -1)) * self.scale  # BxHxKxN
        attn = self.attn_drop(logits.softmax(dim=-1))
        out = (attn @ v).transpose(1, 2).reshape(b, k, d)
        return self.proj(out), logits.mean(dim=1)


class ATMLayer(nn.Module):
    """One decoder layer: cross-attention then a ReLU feed-forward (4x), each followed by
    residual + LayerNorm (post-norm); no self-attention among the queries.

    ``forward(q, memory)``: BxKxD, BxNxD -> (BxKxD queries, BxKxN mask logits).
    """

    def __init__(self, dim: int, heads: int, dropout: float = DROPOUT) -> None:
        super().__init__()
        self.cross_attn = MaskCrossAttention(dim, heads, dropout)
        self.norm_attn = nn.LayerNorm(dim)
        self.ffn_in = nn.Linear(dim, 4 * dim)
        self.ffn_out = nn.Linear(4 * dim, dim)
        self.norm_ffn = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, q: torch.Tensor, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out, logits = self.cross_attn(q, memory)
        q = self.norm_attn(q + self.dropout(out))
        ffn = self.ffn_out(self.dropout(F.relu(self.ffn_in(q))))
        q = self.norm_ffn(q + self.dropout(ffn))
        return q, logits


class ATMDecoder(nn.Module):
    """The ATM decoder (see the module docstring): relationship-descriptor queries, ``layers``
    :class:`ATMLayer`, per-layer mask logits from the cross-attention.

    ``forward(memory, cls, text, size)``: ``memory`` BxNxD, ``cls`` BxD, ``text`` BxKxD (all
    L2-normalised), ``size`` = (h, w) with h*w = N -> list over layers of BxKxhxw mask logits
    (the last one is the segmentation).
    """

    def __init__(self, dim: int, heads: int, layers: int, dropout: float = DROPOUT) -> None:
        super().__init__()
        if dim % heads:
            raise ConfigError(
                f"train.clip.decoder_dim: {dim} is not divisible by decoder_heads {heads}"
            )
        self.q_proj = nn.Linear(2 * dim, dim)
        self.layers = nn.ModuleList(ATMLayer(dim, heads, dropout) for _ in range(layers))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The published ``init_weights``: Linear weights truncated normal (std 0.02), biases
        0; LayerNorm 1 and 0."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02, a=-2.0, b=2.0)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @staticmethod
    def relationship(text: torch.Tensor, cls: torch.Tensor) -> torch.Tensor:
        """BxKxD text, BxD CLS -> BxKx2D descriptor [cls * text_k, text_k] (``get_qs``)."""
        return torch.cat([cls.unsqueeze(1) * text, text], dim=-1)

    def forward(
        self,
        memory: torch.Tensor,
        cls: torch.Tensor,
        text: torch.Tensor,
        size: tuple[int, int],
    ) -> list[torch.Tensor]:
        b, k = text.shape[:2]
        q = self.q_proj(self.relationship(text, cls))
        masks = []
        for layer in self.layers:
            q, logits = layer(q, memory)
            masks.append(logits.reshape(b, k, *size))
        return masks


# --------------------------------------------------------------------------------------------
# loss
# --------------------------------------------------------------------------------------------
def class_targets(target: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """BxHxW target in the sampled index space (0 = background, ``j`` = the ``j``-th class
    scored, negative = ignore) -> (BxKxHxW float binary masks of classes 1..K, BxHxW float
    valid). Background pixels are negatives for every class."""
    classes = torch.arange(1, k + 1, device=target.device).view(1, k, 1, 1)
    return (target.unsqueeze(1) == classes).float(), (target >= 0).float()


def mask_count(target: torch.Tensor, k: int) -> torch.Tensor:
    """The number of (image, class) pairs with at least one pixel in the BxHxW target
    (classes 1..K), as a float tensor (the criterion's ``num_masks`` before averaging)."""
    present = torch.zeros(target.shape[0], k + 1, device=target.device, dtype=torch.bool)
    present.scatter_(1, target.flatten(1).clamp_min(0), True)
    return present[:, 1:].sum().float()


def average_over_processes(count: torch.Tensor) -> float:
    """``num_masks`` as the published criterion normalises it: averaged over the processes of
    a distributed run (so N processes give one process's loss), at least 1."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        count = count.clone()
        dist.all_reduce(count)
        count = count / dist.get_world_size()
    return max(float(count), 1.0)


def seg_loss_plus(
    masks: torch.Tensor,
    target: torch.Tensor,
    mask_weight: float,
    dice_weight: float,
    stride: int = 1,
    num_masks: float | None = None,
) -> torch.Tensor:
    """SegLossPlus of one layer's BxKxhxw mask logits against a BxHxW target (sampled index
    space: 0 background, ``j`` -> mask ``j - 1``, negative = ignore).

    1. The target is nearest-downsampled to (H // ``stride``, W // ``stride``) (published: 1,
       the full crop) and the masks bilinearly resized to it.
    2. Focal: per element sigmoid focal loss, averaged over each image's valid pixels, summed
       over images and classes.
    3. Dice: ``1 - (2 sum(p t) + 1) / (sum p + sum t + 1)`` over valid pixels for each (image,
       class present in its target), summed.
    4. Both divided by ``num_masks`` (default: the (image, present class) pairs of the target,
       averaged over processes, at least 1); returns ``mask_weight`` x focal + ``dice_weight``
       x dice.

    With no ignore pixels and ``stride`` 1 this is the published criterion exactly.
    """
    # 1. Resolution.
    b, k = masks.shape[:2]
    h, w = target.shape[-2:]
    size = (max(1, h // stride), max(1, w // stride))
    if size != (h, w):
        target = F.interpolate(target[:, None].float(), size=size, mode="nearest")[:, 0].long()
    x = masks.float()
    if tuple(x.shape[-2:]) != size:
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    t, valid = class_targets(target, k)
    vmask = valid.unsqueeze(1)
    if num_masks is None:
        num_masks = average_over_processes(mask_count(target, k))
    # 2. Sigmoid focal loss, mean over each image's valid pixels.
    p = x.sigmoid()
    ce = F.binary_cross_entropy_with_logits(x, t, reduction="none")
    p_t = p * t + (1 - p) * (1 - t)
    a_t = FOCAL_ALPHA * t + (1 - FOCAL_ALPHA) * (1 - t)
    focal = a_t * ce * (1 - p_t) ** FOCAL_GAMMA * vmask
    pixels = valid.sum(dim=(1, 2)).clamp_min(1).view(b, 1)
    focal = (focal.sum(dim=(2, 3)) / pixels).sum()
    # 3. Dice over the classes present in each image.
    pv = p * vmask
    inter = (pv * t).sum(dim=(2, 3))
    dice = 1 - (2 * inter + 1) / (pv.sum(dim=(2, 3)) + t.sum(dim=(2, 3)) + 1)
    present = t.sum(dim=(2, 3)) > 0
    dice = (dice * present).sum()
    # 4. Normalised by the number of masks.
    return (mask_weight * focal + dice_weight * dice) / num_masks

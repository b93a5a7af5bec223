"""Stage ``pretrain``: the image tower trained against the frozen text tower, and its zero-shot
report.

Training (LiT-style: the text tower is frozen, only the image tower and a temperature learn):
each step draws ``batch_size`` corpus images (stream ``pretrain.batches``), embeds them, and
scores each against the captions of every catalogue class in the image's own caption context
(:data:`magicseg.miniclip.corpus.CONTEXTS`); the loss is the cross-entropy of that 252-way
softmax at a learned temperature, plus ``dense_weight`` x the same cross-entropy on dense
scores: every position's projected feature against every caption, pooled over the positions by
the mean of the best ``dense_top_fraction`` of them (multiple-instance learning: the caption
names what is somewhere in the image, so some positions must match it and none may match
another caption strongly). AdamW,
linear warm-up, cosine decay to 5% of the peak.

Zero-shot test: ``test_images`` images of their own stream (``pretrain.test``), classified
against the bare class names (the text the segmenters encode); top-1 overall and on the seen and
held-out classes of the vocabulary split given (``vocabulary`` and the global ``seed`` draw it);
``dense_top1``: each object position's projected feature alone classified the same way (the
positions at stride 4 that the object's mask covers for at least half), the skill a segmenter
on the frozen tower starts from.

The checkpoint records a key over the ``pretrain`` params and the source of the code that draws
and trains (this package, :mod:`magicseg.scene` and the catalogue): when DVC re-runs
the stage because only the split changed (the global seed, the vocabulary params), a checkpoint
with the same key is kept and only the report is computed again.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from magicseg.core.config import PretrainParams
from magicseg.core.seeding import derive_seed, rng
from magicseg.miniclip import corpus as C
from magicseg.miniclip.model import CHECKPOINT, ImageTower, load_tower, save_tower

KEY_SOURCES = ("miniclip", "scene.py", "core/catalogue.py")
"""What the training key hashes besides the params (paths under ``src/magicseg``)."""
MAX_LOGIT_SCALE = math.log(100.0)
RECORD_EVERY = 50
"""Steps per loss record (the mean over them) in the checkpoint's meta."""


def training_key(params: PretrainParams, text_encoder: str) -> str:
    """16 hex digits over the params, the text encoder's name and the sources of
    :data:`KEY_SOURCES` (bytecode excluded)."""
    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha256(json.dumps(params.model_dump(mode="json"), sort_keys=True).encode())
    h.update(text_encoder.encode())
    for rel in KEY_SOURCES:
        p = root / rel
        for f in sorted(p.rglob("*.py")) if p.is_dir() else [p]:
            h.update(str(f.relative_to(root)).encode() + b"\x1f" + f.read_bytes())
    return h.hexdigest()[:16]


def _as_tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0


@torch.no_grad()
def embed(tower: ImageTower, images: np.ndarray, batch: int = 256) -> torch.Tensor:
    """NxSxSx3 uint8 -> NxE L2-normalised global embeddings."""
    out = [tower(_as_tensor(images[s : s + batch])).glob for s in range(0, len(images), batch)]
    return F.normalize(torch.cat(out).float(), dim=-1)


@torch.no_grad()
def dense_correct(
    tower: ImageTower, test: C.Corpus, class_text: torch.Tensor, batch: int = 256
) -> np.ndarray:
    """N fraction of each test image's object positions (stride 4, mask covering at least half
    of the 4x4 cell) whose projected feature alone is closest to the image's class text."""
    text = F.normalize(class_text, dim=-1)
    out = []
    for s in range(0, len(test.images), batch):
        o = tower(_as_tensor(test.images[s : s + batch]))
        dense = F.normalize(tower.project(o.tokens).float(), dim=1)
        pred = torch.einsum("behw,ke->bkhw", dense, text).argmax(1)
        masks = torch.from_numpy(test.masks[s : s + batch]).float()[:, None]
        obj = F.avg_pool2d(masks, tower.patch)[:, 0] >= 0.5
        ok = (pred == torch.from_numpy(test.classes[s : s + batch])[:, None, None]) & obj
        out.append(ok.flatten(1).sum(1).float() / obj.flatten(1).sum(1).clamp(min=1).float())
    return torch.cat(out).numpy()


def zero_shot(
    tower: ImageTower,
    test: C.Corpus,
    class_text: torch.Tensor,
    split: dict[int, str],
) -> dict:
    """Top-1 of the test images against ``class_text`` (NclassxE, bare names): overall and
    per split group (``seen``, ``heldout``, and the held-out kinds); ``dense_top1`` (and per
    group): the mean over the images of their object positions classified right alone."""
    pred = (embed(tower, test.images) @ F.normalize(class_text, dim=-1).T).argmax(1).numpy()
    correct = pred == test.classes
    dense = dense_correct(tower, test, class_text)
    out = {"top1": round(float(correct.mean()), 4)}
    groups: dict[str, list[bool]] = {}
    for cls, ok in zip(test.classes, correct, strict=True):
        group = split[int(cls)]
        groups.setdefault(group, []).append(bool(ok))
        if group not in ("seen", "unused"):
            groups.setdefault("heldout", []).append(bool(ok))
    for group in ("seen", "heldout", *sorted(g for g in groups if g not in ("seen", "heldout"))):
        if group in groups and group != "unused":
            name = group if group in ("seen", "heldout") else f"heldout_{group}"
            out[f"top1_{name}"] = round(float(np.mean(groups[group])), 4)
    out["dense_top1"] = round(float(dense.mean()), 4)
    for group in ("seen", "heldout", "novel"):
        keep = [
            split[int(c)] == group
            or (group == "heldout" and split[int(c)] not in ("seen", "unused"))
            for c in test.classes
        ]
        if any(keep):
            name = group if group != "novel" else "heldout_novel"
            out[f"dense_top1_{name}"] = round(float(dense[np.array(keep)].mean()), 4)
    return out


def train_tower(
    params: PretrainParams,
    corpus: C.Corpus,
    table: torch.Tensor,
    progress: bool = True,
) -> tuple[ImageTower, float, list[dict]]:
    """Train a fresh tower; ``table``: contexts x classes x E normalised caption embeddings.
    Returns (tower in eval mode, logit scale, loss records)."""
    from tqdm import tqdm

    torch.manual_seed(derive_seed(params.seed, "pretrain.init"))
    tower = ImageTower(
        params.stem_width,
        params.width,
        params.layers,
        params.heads,
        params.mlp_ratio,
        int(table.shape[-1]),
        params.size,
    )
    scale = torch.nn.Parameter(torch.tensor(math.log(params.logit_scale)))
    opt = torch.optim.AdamW(
        [*tower.parameters(), scale], lr=params.lr, weight_decay=params.weight_decay
    )
    warm, steps = params.warmup_steps, params.steps

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, steps - warm)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    bf16 = params.precision == "bf16"
    n = len(corpus.images)
    batch = min(params.batch_size, n)
    records, window = [], []
    tower.train()
    for step in tqdm(range(steps), desc="pretrain", unit="step", disable=not progress):
        idx = rng(params.seed, "pretrain.batches", step).choice(n, batch, replace=False)
        images = _as_tensor(corpus.images[idx])
        target = torch.from_numpy(corpus.classes[idx])
        texts = table[torch.from_numpy(corpus.contexts[idx])]  # BxKxE
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = tower(images)
        img = F.normalize(out.glob.float(), dim=-1)
        logits = torch.einsum("be,bke->bk", img, texts) * scale.exp()
        loss = F.cross_entropy(logits, target)
        if params.dense_weight > 0:  # multiple-instance: the best positions' mean score
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                dense = tower.project(out.tokens)
            dense = F.normalize(dense.float(), dim=1).flatten(2)  # BxExN
            per_pos = torch.einsum("ben,bke->bkn", dense, texts) * scale.exp()  # BxKxN
            top = max(1, round(params.dense_top_fraction * per_pos.shape[2]))
            pooled = per_pos.topk(top, dim=2).values.mean(2)
            loss = loss + params.dense_weight * F.cross_entropy(pooled, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            scale.clamp_(max=MAX_LOGIT_SCALE)
        window.append(loss.item())
        if (step + 1) % RECORD_EVERY == 0 or step + 1 == steps:
            acc = float((logits.argmax(1) == target).float().mean())
            records.append(
                {"step": step + 1, "loss": round(float(np.mean(window)), 4), "batch_top1": acc}
            )
            window = []
            if progress:
                tqdm.write(f"pretrain step {step + 1}: loss {records[-1]['loss']} top1 {acc:.3f}")
    return tower.eval(), float(scale.detach().exp()), records


def pretrain(
    params: PretrainParams,
    out_dir: str | Path,
    split_names: Sequence[str],
    holdout: set[int],
    kinds: dict[str, Sequence[int]],
    encoder=None,
    progress: bool = True,
) -> dict:
    """Train (or keep, when the checkpoint's key matches) the tower into ``out_dir`` and return
    the report: zero-shot top-1 (overall, seen, held-out and by kind), the final training loss,
    steps, images and parameters. ``split_names``/``holdout``/``kinds``:
    the vocabulary's names, 1-based held-out ids and held-out ids by kind. ``encoder``: the
    frozen text tower (default: MiniLM)."""
    from magicseg.miniclip.text import HFMeanPoolEncoder, minilm_path

    if params.num_threads:
        torch.set_num_threads(params.num_threads)
    t0 = time.perf_counter()
    encoder = encoder or HFMeanPoolEncoder(minilm_path(), name="minilm")
    out_dir = Path(out_dir)
    key = training_key(params, encoder.name)
    names = C.class_names()
    split = C.split_of(split_names, holdout, kinds)

    # 1. The kept checkpoint when it was trained from the same params and code.
    ckpt = out_dir / CHECKPOINT
    tower, blob = None, None
    if ckpt.is_file():
        tower, blob = load_tower(ckpt)
        if blob["meta"].get("key") != key:
            tower, blob = None, None
    trained = tower is None
    if trained:
        # 2. Captions through the frozen text tower, the corpus, the training.
        texts = C.caption_texts()
        table = encoder.encode(texts).float().view(len(C.CONTEXTS), len(names), -1)
        corpus = C.render_corpus(
            params.seed,
            False,
            params.images,
            params.size,
            params.plain_fraction,
            params.distractors,
            progress,
        )
        t1 = time.perf_counter()
        tower, scale, records = train_tower(params, corpus, table, progress)
        meta = {
            "key": key,
            "text_encoder": encoder.name,
            "final_loss": records[-1]["loss"],
            "records": records,
        }
        out_dir.mkdir(parents=True, exist_ok=True)
        save_tower(ckpt, tower, scale, meta)
        print(f"pretrain: rendered in {t1 - t0:.0f} s, trained in {time.perf_counter() - t1:.0f} s")
        blob = {"meta": meta}
    # 3. The zero-shot report on the test stream.
    test = C.render_corpus(
        params.seed,
        True,
        params.test_images,
        params.size,
        params.plain_fraction,
        params.distractors,
    )
    class_text = encoder.encode(names).float()
    report = zero_shot(tower, test, class_text, split)
    report |= {
        "final_loss": blob["meta"]["final_loss"],
        "steps": params.steps,
        "images": params.images,
        "test_images": params.test_images,
        "parameters": int(sum(p.numel() for p in tower.parameters())),
    }
    if not trained:
        print(f"pretrain: {ckpt} was trained from the same params and code: kept")
    return report

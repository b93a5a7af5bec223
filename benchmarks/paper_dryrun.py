"""Full-size dry run of the paper profile: random weights, the project's own code, every stage.

The released architectures are built from configs with random weights (no hub, no download):
Stable Diffusion 1.5 (UNet 860M, VAE 84M, CLIP ViT-L/14 text encoder 123M), Grounding DINO
Swin-T + BERT-base (172M), SAM ViT-H (641M) and CLIP ViT-B/16 (150M) with 10 visual prompt
tokens per layer and the decoder the paper profile names. One batch then goes through the real
code paths at the paper's sizes:

1. generate: ``DiffusersPairGenerator`` on a pipeline assembled from those components,
   ``generate.batch_size`` prompts (LVIS classes, template writer), 512 px;
2. label: ``GroundedSamLabeler`` on the generated pairs (captions from the 1203 LVIS names as
   the labeler builds them, SAM at 1024, the counterfactual check as the profile says);
3. train: one or more steps of the clip segmenter through the training code (category
   sampling of 100 of the 1203 classes, augmentation, crop 512, loss with the counterfactual
   term, backward, AdamW step; bf16 autocast on CUDA, as ``magicseg.training.loop.train`` runs).

Per stage it prints build seconds, run seconds (CUDA synchronised), peak memory (CUDA
``max_memory_allocated``; process peak RSS), parameter counts, and extrapolates to the paper's
full run (``prompts.requests x prompts.per_request`` pairs, ``train.steps`` steps of
``train.batch_size``) in device-hours (GPU-hours on CUDA): generate from the last run's
seconds per pair, with fewer steps than the profile's plus the missing steps at the UNet's
steady per-call time; label per pair; train per step, scaled by the profile's batch over the
run's, plus the text features once. Shapes that break only at full size break here.

    python benchmarks/paper_dryrun.py --device cuda            # the profile's batches, 20 steps
    python benchmarks/paper_dryrun.py --device cpu             # 1 pair, 2 steps: 551 CPU-s
                                                               # (14 min on 2 busy cores)
    python benchmarks/paper_dryrun.py --tiny --json out.json   # tiny configs, seconds (the tests)

Overrides of the paper profile, all printed: the model references (random in-memory models),
the devices, ``--steps``/``--pairs``/``--train-batch`` when given (CPU defaults are smaller),
and the detector thresholds set to 0 (random weights score no box above a real threshold;
at 0 every image sends its ``max_detections`` best boxes to SAM, the worst case). Tokenizers
are synthetic: a bert-base-uncased-sized WordPiece vocabulary (30522 entries) holding the words
of the prompts, class names and templates, written to a temporary directory, used by all text
towers (``model_max_length`` 77 for the CLIP ones). Needs torch, transformers, diffusers,
accelerate, pydantic, numpy, pandas, pillow, pyyaml, scipy, tqdm; nothing from the hub.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import resource
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src")]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

NEEDS = ("torch", "transformers", "diffusers", "accelerate", "pydantic", "numpy", "pandas",
         "PIL", "yaml", "scipy", "tqdm")  # fmt: skip

# --------------------------------------------------------------------------------------------
# architectures: the released ones, and a tiny twin of each for the tests
# --------------------------------------------------------------------------------------------
ARCHS: dict[str, dict] = {
    "paper": {
        "names": {"sd": "SD 1.5", "gdino": "Grounding DINO Swin-T", "sam": "SAM ViT-H",
                  "clip": "CLIP ViT-B/16"},
        "image": 512,
        "unet": {"block_out_channels": (320, 640, 1280, 1280), "layers_per_block": 2,
                 "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                 "cross_attention_dim": 768, "attention_head_dim": 8},
        "vae": {"block_out_channels": (128, 256, 512, 512), "layers_per_block": 2},
        "sd_text": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                    "num_attention_heads": 12, "projection_dim": 768},
        "gdino": {},  # GroundingDinoConfig's defaults: Swin-T + BERT-base, 900 queries
        "sam": {"vision_config": {"hidden_size": 1280, "num_hidden_layers": 32,
                                  "num_attention_heads": 16,
                                  "global_attn_indexes": [7, 15, 23, 31]}},
        "sam_px": 1024,
        "clip_vision": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                        "num_attention_heads": 12, "image_size": 224, "patch_size": 16},
        "clip_text": {"hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 12,
                      "num_attention_heads": 8},
        "clip_projection": 512,
        "crop": 512,
    },
    "tiny": {
        "names": {"sd": "tiny SD", "gdino": "tiny Grounding DINO", "sam": "tiny SAM",
                  "clip": "tiny CLIP"},
        "image": 64,
        "unet": {"block_out_channels": (32, 64), "layers_per_block": 1,
                 "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
                 "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
                 "cross_attention_dim": 32, "attention_head_dim": 8},
        "vae": {"block_out_channels": (32, 64), "layers_per_block": 1},
        "sd_text": {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2,
                    "num_attention_heads": 4, "projection_dim": 32},
        "gdino": {"backbone": {"image_size": 128, "embed_dim": 16, "depths": [1, 1, 1, 1],
                               "num_heads": [1, 1, 2, 2], "window_size": 4,
                               "out_features": ["stage2", "stage3", "stage4"]},
                  "text": {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                           "intermediate_size": 64},
                  "d_model": 32, "encoder_layers": 1, "decoder_layers": 2, "num_queries": 20,
                  "encoder_n_points": 2, "decoder_n_points": 2, "encoder_ffn_dim": 64,
                  "decoder_ffn_dim": 64, "encoder_attention_heads": 2,
                  "decoder_attention_heads": 2, "px": 128},
        "sam": {"vision_config": {"hidden_size": 32, "num_hidden_layers": 2,
                                  "num_attention_heads": 2, "image_size": 128, "patch_size": 16,
                                  "output_channels": 32, "intermediate_size": 64, "mlp_dim": 64,
                                  "global_attn_indexes": [1], "window_size": 4,
                                  "num_pos_feats": 16},
                "prompt_encoder_config": {"hidden_size": 32, "image_size": 128,
                                          "patch_size": 16},
                "mask_decoder_config": {"hidden_size": 32, "num_hidden_layers": 2,
                                        "num_attention_heads": 2, "mlp_dim": 64,
                                        "iou_head_hidden_dim": 32}},
        "sam_px": 128,
        "clip_vision": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                        "num_attention_heads": 2, "image_size": 32, "patch_size": 8},
        "clip_text": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                      "num_attention_heads": 2},
        "clip_projection": 16,
        "crop": 32,
    },
}  # fmt: skip
"""SD 1.5 (UNet, VAE, ViT-L/14 text encoder), Grounding DINO Swin-T/BERT-base, SAM ViT-H and
CLIP ViT-B/16 as released; ``tiny``: the same builders with toy sizes."""

CLIP_VOCAB = 49408
"""The CLIP BPE vocabulary size of SD 1.5's and CLIP's text towers (the synthetic tokenizer's
ids stay below it)."""
BERT_VOCAB = 30522
SPECIALS = {0: "[PAD]", 100: "[UNK]", 101: "[CLS]", 102: "[SEP]", 103: "[MASK]"}


# --------------------------------------------------------------------------------------------
# measuring
# --------------------------------------------------------------------------------------------
class PeakRss:
    """Peak resident memory of this process over a stretch of code: Linux's high-water mark,
    reset at the start (``/proc/self/clear_refs``), or a 10 ms sampler where that is refused;
    ``ru_maxrss`` (the peak since the start) elsewhere."""

    def __init__(self) -> None:
        self.sampled = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.reset_ok = False

    @staticmethod
    def _status(key: str) -> int | None:
        try:
            m = re.search(rf"{key}:\s+(\d+) kB", Path("/proc/self/status").read_text())
        except OSError:
            return None
        return int(m.group(1)) * 1024 if m else None

    def start(self) -> None:
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.reset_ok = self._status("VmHWM") is not None
        except OSError:
            self.reset_ok = False
        if not self.reset_ok and self._status("VmRSS") is not None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(0.01):
            self.sampled = max(self.sampled, self._status("VmRSS") or 0)

    def stop(self) -> int:
        """Peak bytes since :meth:`start`."""
        if self.reset_ok:
            return self._status("VmHWM") or 0
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            return self.sampled
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@dataclass
class Stage:
    """Figures of one stage: seconds of each timed part, peak memory, parameter counts."""

    name: str
    seconds: dict[str, list[float]] = field(default_factory=dict)
    peak_rss: int = 0
    peak_cuda: int = 0
    params: dict[str, int] = field(default_factory=dict)
    facts: dict = field(default_factory=dict)

    def best(self, part: str) -> float:
        """The part's time for extrapolation: the last run (the first warms kernels up)."""
        return self.seconds[part][-1]


@contextmanager
def timed(stage: Stage, part: str, device) -> Iterator[None]:
    """Time ``part`` of ``stage`` (synchronised on CUDA) and fold its peak memory in."""
    import torch

    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    rss = PeakRss()
    rss.start()
    t0 = time.perf_counter()
    try:
        yield
    finally:
        if cuda:
            torch.cuda.synchronize()
        stage.seconds.setdefault(part, []).append(time.perf_counter() - t0)
        stage.peak_rss = max(stage.peak_rss, rss.stop())
        if cuda:
            stage.peak_cuda = max(stage.peak_cuda, torch.cuda.max_memory_allocated())
        print(f"  {stage.name} {part}: {stage.seconds[part][-1]:.1f}s", flush=True)


@contextmanager
def module_clock(module, device) -> Iterator[list[float]]:
    """Seconds of each of ``module``'s forward calls (synchronised on CUDA), appended to the
    yielded list."""
    import torch

    calls: list[float] = []
    start: list[float] = []

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def before(*_: object) -> None:
        sync()
        start.append(time.perf_counter())

    def after(*_: object) -> None:
        sync()
        calls.append(time.perf_counter() - start.pop())

    hooks = [module.register_forward_pre_hook(before), module.register_forward_hook(after)]
    try:
        yield calls
    finally:
        for h in hooks:
            h.remove()


def count(module) -> int:
    return int(sum(p.numel() for p in module.parameters()))


def free(device) -> None:
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------------
# params: the paper profile, composed without hydra
# --------------------------------------------------------------------------------------------
def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        out[key] = (
            _merge(out[key], value)
            if isinstance(value, dict) and isinstance(out.get(key), dict)
            else value
        )
    return out


def paper_params(root: Path = ROOT) -> dict:
    """``conf/config.yaml`` with ``conf/profile/paper.yaml`` merged in, as Hydra composes it
    for ``dvc exp run -S profile=paper`` (a plain dict, before validation)."""
    import yaml

    base = yaml.safe_load((root / "conf/config.yaml").read_text())
    base.pop("defaults", None)
    return _merge(base, yaml.safe_load((root / "conf/profile/paper.yaml").read_text()))


# --------------------------------------------------------------------------------------------
# a synthetic tokenizer (no files from the hub or a package)
# --------------------------------------------------------------------------------------------
def write_wordpiece(directory: Path, texts: list[str]) -> Path:
    """A bert-base-uncased-sized WordPiece vocabulary (30522 entries, its special tokens at
    their ids) holding every lower-cased word and punctuation mark of ``texts``, single
    characters and ``##`` characters (no text maps to [UNK]); returns the directory."""
    words: dict[str, None] = {}
    chars = "abcdefghijklmnopqrstuvwxyz0123456789"
    for text in texts:
        for word in re.findall(r"\w+|[^\w\s]", text.lower()):
            words[word] = None
    tokens = [SPECIALS.get(i, f"[unused{i}]") for i in range(104)]
    body = list(dict.fromkeys([*chars, *(f"##{c}" for c in chars), *words]))
    body = [t for t in body if t not in tokens]
    if len(tokens) + len(body) > BERT_VOCAB:
        raise ValueError(f"{len(body)} words do not fit a {BERT_VOCAB}-token vocabulary")
    tokens += body
    tokens += [f"[unused{i}]" for i in range(len(tokens), BERT_VOCAB)]
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.txt").write_text("\n".join(tokens) + "\n")
    (directory / "tokenizer_config.json").write_text(
        json.dumps({"do_lower_case": True, "tokenizer_class": "BertTokenizer"})
    )
    return directory


def load_tokenizer(directory: Path, max_length: int, text_inputs_only: bool = False):
    """The WordPiece tokenizer of :func:`write_wordpiece` (``from_pretrained``: in transformers
    5 ``BertTokenizer(vocab_file=...)`` silently makes a 5-token vocabulary)."""
    from transformers import BertTokenizer

    kw = {"model_input_names": ["input_ids", "attention_mask"]} if text_inputs_only else {}
    tok = BertTokenizer.from_pretrained(str(directory), model_max_length=max_length, **kw)
    if len(tok) != BERT_VOCAB:
        raise RuntimeError(f"synthetic tokenizer has {len(tok)} tokens, expected {BERT_VOCAB}")
    return tok


# --------------------------------------------------------------------------------------------
# builders (random weights, on the target device)
# --------------------------------------------------------------------------------------------
def sd_models(arch: dict, device) -> dict:
    """SD 1.5's UNet, VAE and text encoder (layout of ``arch``), random weights on ``device``
    (``meta`` builds them without memory)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    px, vae = arch["image"], arch["vae"]
    levels = len(vae["block_out_channels"])
    torch.manual_seed(0)
    with torch.device(device):
        return {
            "unet": UNet2DConditionModel(
                sample_size=px // 2 ** (levels - 1), norm_num_groups=32, **arch["unet"]
            ),
            "vae": AutoencoderKL(
                down_block_types=("DownEncoderBlock2D",) * levels,
                up_block_types=("UpDecoderBlock2D",) * levels,
                latent_channels=4,
                norm_num_groups=32,
                sample_size=px,
                **vae,
            ),
            "text_encoder": CLIPTextModel(
                CLIPTextConfig(
                    vocab_size=CLIP_VOCAB,
                    max_position_embeddings=77,
                    hidden_act="quick_gelu",
                    bos_token_id=101,
                    eos_token_id=102,
                    pad_token_id=0,
                    **arch["sd_text"],
                )
            ).eval(),
        }


def build_sd(arch: dict, tokenizer, device, dtype):
    """A StableDiffusionPipeline of the SD 1.5 layout, random weights, SD 1.5's scheduler."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    scheduler = PNDMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        skip_prk_steps=True,
        steps_offset=1,
        set_alpha_to_one=False,
    )
    pipe = StableDiffusionPipeline(
        **sd_models(arch, device),
        tokenizer=tokenizer,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    return pipe.to(device=device, dtype=dtype)


def _pil_processor(module: str, name: str):
    """transformers' PIL image processor class (named ``...Pil`` since 5.x, before without)."""
    import importlib

    try:
        return getattr(importlib.import_module(f"transformers.models.{module}"), f"{name}Pil")
    except (ImportError, AttributeError):
        return getattr(importlib.import_module("transformers"), name)


def grounded_sam_models(arch: dict, device) -> tuple:
    """(Grounding DINO, SAM) of ``arch``'s layout, random weights on ``device``."""
    import torch
    from transformers import (
        BertConfig,
        GroundingDinoConfig,
        GroundingDinoForObjectDetection,
        SamConfig,
        SamModel,
        SwinConfig,
    )

    g = dict(arch["gdino"])
    g.pop("px", None)
    if g:
        config = GroundingDinoConfig(
            backbone_config=SwinConfig(**g.pop("backbone")),
            text_config=BertConfig(vocab_size=BERT_VOCAB, **g.pop("text")),
            max_text_len=256,
            **g,
        )
    else:
        config = GroundingDinoConfig(max_text_len=256)
    torch.manual_seed(0)
    with torch.device(device):
        return GroundingDinoForObjectDetection(config), SamModel(SamConfig(**arch["sam"]))


def build_grounded_sam(arch: dict, tokenizer, device, dtype) -> tuple:
    """(Grounding DINO, its processor, SAM, its processor): random weights, eval, on device."""
    from transformers import GroundingDinoProcessor, SamProcessor

    gd_proc_cls = _pil_processor(
        "grounding_dino.image_processing_pil_grounding_dino", "GroundingDinoImageProcessor"
    )
    sam_proc_cls = _pil_processor("sam.image_processing_pil_sam", "SamImageProcessor")
    px = arch["gdino"].get("px")
    gd_image = (
        gd_proc_cls(size={"shortest_edge": px, "longest_edge": px * 5 // 4})
        if px
        else gd_proc_cls()
    )
    px = arch["sam_px"]
    sam_image = sam_proc_cls(
        size={"longest_edge": px},
        pad_size={"height": px, "width": px},
        mask_size={"longest_edge": px // 4},
        mask_pad_size={"height": px // 4, "width": px // 4},
    )
    det, sam = grounded_sam_models(arch, device)
    # .to(device) too: a few parameters (Grounding DINO's level_embed) are made with legacy
    # constructors that ignore the torch.device context they were built in
    return (
        det.to(device, dtype).eval(),
        GroundingDinoProcessor(image_processor=gd_image, tokenizer=tokenizer),
        sam.to(device, dtype).eval(),
        SamProcessor(image_processor=sam_image),
    )


def clip_model(arch: dict, device="cpu"):
    """A random ``CLIPModel`` (ViT-B/16 layout for ``paper``) on ``device``."""
    import torch
    from transformers import CLIPConfig, CLIPModel

    cfg = CLIPConfig(
        text_config={
            "vocab_size": CLIP_VOCAB,
            "max_position_embeddings": 77,
            "bos_token_id": 101,
            "eos_token_id": 102,
            "pad_token_id": 0,
            **arch["clip_text"],
        },
        vision_config=arch["clip_vision"],
        projection_dim=arch["clip_projection"],
    )
    torch.manual_seed(0)
    with torch.device(device):
        return CLIPModel(cfg)


def write_clip(arch: dict, tokenizer, directory: Path) -> Path:
    """A random CLIP and the tokenizer, saved as a checkpoint directory that the training code
    loads by path like a hub id."""
    clip_model(arch).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


# --------------------------------------------------------------------------------------------
# the stages
# --------------------------------------------------------------------------------------------
def make_records(params, vocab, n: int) -> list:
    """``n`` prompt records as the prompts stage makes them (the first description of each of
    the first ``n`` planned requests; the template writer stands in for the LLM)."""
    from magicseg.core.seeding import derive_seed
    from magicseg.generate.base import PromptRecord
    from magicseg.prompts.base import PromptRequest
    from magicseg.prompts.counterfactual import make_counterfactual
    from magicseg.prompts.stage import plan_requests
    from magicseg.prompts.template import TemplateWriter

    plans = plan_requests(vocab, params.prompts.model_copy(update={"requests": n}), params.seed)
    names = [tuple(vocab.display[i - 1] for i in ids) for ids in plans]
    texts = TemplateWriter(params.prompts.style).write(
        [
            PromptRequest(c, 1, derive_seed(params.seed, "prompts.request", r))
            for r, c in enumerate(names)
        ]
    )
    out = []
    for r, (ids, classes, (text,)) in enumerate(zip(plans, names, texts, strict=True)):
        pid = f"r{r:06d}-000"
        out.append(
            PromptRecord(
                id=pid,
                prompt=text,
                cf_prompt=make_counterfactual(text, classes),
                class_ids=tuple(ids),
                class_names=classes,
                seed=derive_seed(params.seed, "generate.sample", pid),
            )
        )
    return out


def run_generate_stage(
    args, arch, params, records, tokenizer, device, profile_steps: int
) -> tuple[Stage, list]:
    """Build SD 1.5 and paint the records' pairs through ``DiffusersPairGenerator``. The time
    inside the UNet is clocked too, so a run with fewer steps than the profile's
    (``profile_steps``) extrapolates to it: run + (profile - run steps) x UNet s per step."""
    import numpy as np

    from magicseg.core.devices import resolve_dtype
    from magicseg.generate.diffusers import DiffusersPairGenerator

    stage = Stage("generate")
    with timed(stage, "build", device):
        dtype = resolve_dtype(params.generate.diffusers.dtype, device, "generate.diffusers.dtype")
        pipe = build_sd(arch, tokenizer, device, dtype)
        gen = DiffusersPairGenerator(params.generate, pipeline=pipe)
        gen.check(records)
    stage.params = {
        "unet": count(pipe.unet),
        "vae": count(pipe.vae),
        "text_encoder": count(pipe.text_encoder),
    }
    for _ in range(args.repeats):
        with timed(stage, "run", device), module_clock(pipe.unet, device) as calls:
            pairs = gen.generate(records)
    meta = pairs[0].meta
    steps = meta["steps"]
    # a UNet call at steady state: the median without the first (kernel selection, warm-up)
    per_call = float(np.median(calls[1:] if len(calls) > 1 else calls))
    stage.facts = {
        "pairs": len(records),
        "size": [params.generate.height, params.generate.width],
        "steps": steps,
        "scheduler": meta["scheduler"],
        "dtype": meta["dtype"],
        "images_per_call": meta["images_per_call"],
        "counterfactual_mode": meta["counterfactual_mode"],
        "unet_calls": len(calls),
        "unet_s": round(sum(calls), 3),
        "unet_call_s": round(per_call, 4),
        "profile_steps": profile_steps,
        "run_at_profile_steps_s": round(
            stage.best("run") + (profile_steps - steps) * len(calls) / steps * per_call, 3
        ),
    }
    if meta["counterfactual_mode"] == "inpaint":
        stage.facts["cf_region_fraction"] = [p.meta["cf_region_fraction"] for p in pairs]
    del gen, pipe
    free(device)
    return stage, pairs


def run_label_stage(args, arch, params, records, pairs, tokenizer, vocab, device) -> tuple:
    """Build Grounding DINO + SAM and label the pairs through ``GroundedSamLabeler``."""
    from magicseg.core.devices import resolve_dtype
    from magicseg.core.io import ignore_index
    from magicseg.label.base import LabelInput
    from magicseg.label.grounded_sam import GroundedSamLabeler, build_captions

    stage = Stage("label")
    opts = params.label.grounded_sam
    with timed(stage, "build", device):
        dtype = resolve_dtype(opts.dtype, device, "label.grounded_sam.dtype")
        models = build_grounded_sam(arch, tokenizer, device, dtype)
        labeler = GroundedSamLabeler(opts, params.label.difference, models=models)
    stage.params = {"grounding_dino": count(models[0]), "sam": count(models[2])}
    inputs = [
        LabelInput(
            id=r.id,
            positive=p.positive,
            counterfactual=p.counterfactual,
            class_ids=r.class_ids,
            class_names=r.class_names,
            oracle_mask=None,
        )
        for r, p in zip(records, pairs, strict=True)
    ]
    ignore = ignore_index(len(vocab))
    for _ in range(args.repeats):
        labeler.timings.reset()
        with timed(stage, "run", device):
            results = labeler.label(inputs, ignore)
    stage.facts = {
        "pairs": len(inputs),
        "dtype": str(dtype).removeprefix("torch."),
        "boxes_per_image": sum(len(r.detections) for r in results) / len(results),
        "cf_check": opts.cf_check,
        "parts_s": {k: round(v, 3) for k, v in labeler.timings.parts.items()},
        "caption_tokens": [
            len(c.input_ids)
            for r in records
            for c in build_captions(r.class_names, tokenizer, labeler.max_tokens)
        ],
    }
    del labeler, models
    free(device)
    return stage, results


class _MemoryIndex:
    """The dry run's labelled pairs as a training index (what :class:`magicseg.training.data.
    TrainItems` reads: ``ids``, ``class_ids``, ``num_classes``, ``read(i)``), in memory."""

    def __init__(self, ids, samples, class_ids, num_classes: int) -> None:
        self.ids, self.samples, self.class_ids = ids, samples, class_ids
        self.num_classes = num_classes

    def __len__(self) -> int:
        return len(self.ids)

    def read(self, i: int, counterfactual: bool = True):
        image, cf, mask = self.samples[i]
        return image, cf, mask.copy()


def run_train_stage(args, arch, params, records, pairs, results, tokenizer, vocab, device, tmp):
    """Train steps of the clip segmenter with the training loop's own pieces."""
    import numpy as np
    import torch
    from accelerate import Accelerator

    from magicseg.core.io import ignore_index
    from magicseg.core.seeding import derive_seed
    from magicseg.model import build_model, build_text_encoder, text_encoder_name
    from magicseg.model.losses import IGNORE
    from magicseg.training import data as D
    from magicseg.training.loop import _LossModule, lr_factor, make_optimizer, model_config

    stage = Stage("train")
    tp = params.train
    # 1. Data: the labelled pairs, repeated up to the batch (as the filter stage would keep
    #    them), as a training index held in memory (the loop streams a manifest's files).
    reps = -(-tp.batch_size // len(pairs))
    ignore = ignore_index(len(vocab))
    samples = []
    for pair, res in zip(pairs, results, strict=True):
        mask = res.mask.astype(np.int64)
        mask[mask == ignore] = IGNORE
        samples.append((pair.positive, pair.counterfactual, mask))
    index = _MemoryIndex(
        ids=tuple(f"{r.id}-{k}" for k in range(reps) for r in records),
        samples=samples * reps,
        class_ids=tuple(tuple(r.class_ids) for _ in range(reps) for r in records),
        num_classes=len(vocab),
    )
    batch_size = min(tp.batch_size, len(index))
    # 2. Model, text encoder and optimiser, as magicseg.training.loop.train builds them.
    bf16 = tp.precision == "bf16" or (tp.precision == "auto" and device.type == "cuda")

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)

    with timed(stage, "build", device):
        acc = Accelerator(cpu=device.type == "cpu", mixed_precision="no")
        write_clip(arch, tokenizer, tmp / "clip")
        cfg = model_config(tp)
        encoder = build_text_encoder(text_encoder_name(tp.architecture, cfg), cfg)
        torch.manual_seed(derive_seed(params.seed, "train.init"))
        model = build_model(tp.architecture, cfg, encoder.dim)
        model.train()
        opt = make_optimizer(model, tp)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(tp))
        wrapped = acc.prepare(_LossModule(model, tp, autocast))
    stage.params = {
        "clip_vision": count(model.encoder.vision),
        "clip_text": count(encoder.model),
        "trained": int(sum(p.numel() for p in model.parameters() if p.requires_grad)),
        "prompt_tokens": int(model.encoder.prompts.numel()),
    }
    # 3. Frozen text features of the whole vocabulary (once per run).
    with timed(stage, "text_features", device):
        features = encoder.encode(list(vocab.names)).float()
    # 4. Steps: read, sample (100 of 1203 classes), augment (crop), loss, backward, AdamW.
    plan = D.BatchPlan(len(index), batch_size, params.seed)
    items = D.TrainItems(index, plan, vocab.trainable, tp.num_sampled, tp, params.seed)
    losses = []
    for step in range(args.train_steps):
        with timed(stage, "step", device):
            batch = D.batch_at(items, step, features).to(acc.device)
            loss, parts = wrapped(batch)
            acc.backward(loss)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(parts[0]))
    if not all(np.isfinite(losses)):
        raise RuntimeError(f"train: non-finite loss {losses}")
    stage.facts = {
        "batch": batch_size,
        "crop": tp.crop,
        "sampled_classes": items.k,
        "vocabulary": len(vocab),
        "cf_loss": tp.cf_loss,
        "cf_weight": tp.cf_weight,
        "decoder": cfg.get("decoder", "query"),
        "templates": tp.clip.templates,
        "loss": [round(x, 4) for x in losses],
        "precision": "bf16" if bf16 else "fp32",
    }
    del wrapped, model, encoder, opt
    free(device)
    return stage


# --------------------------------------------------------------------------------------------
# the run
# --------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    ap.add_argument("--tiny", action="store_true", help="toy sizes of every model (tests)")
    ap.add_argument(
        "--steps", type=int, help="denoising steps (default: the profile's 20 on cuda, 2 on a CPU)"
    )
    ap.add_argument(
        "--pairs",
        type=int,
        help="prompts in the batch (default: the profile's generate.batch_size on cuda, 1 on a "
        "CPU)",
    )
    ap.add_argument(
        "--train-batch",
        type=int,
        help="images per training step (default: the profile's train.batch_size on cuda, 2 on "
        "a CPU)",
    )
    ap.add_argument(
        "--train-steps",
        type=int,
        help="timed training steps (default 3 on cuda, 1 on a CPU; the last is extrapolated)",
    )
    ap.add_argument(
        "--repeats",
        type=int,
        help="runs of generate and label (default 2 on cuda, 1 on a CPU; the last is extrapolated)",
    )
    ap.add_argument(
        "--counterfactual-mode",
        choices=["prompt_swap", "inpaint"],
        help="override generate.diffusers.counterfactual_mode (inpaint: pair_noise shared too)",
    )
    ap.add_argument("--json", type=Path, help="write the figures to this JSON file")
    return ap.parse_args(argv)


def check_imports() -> None:
    import importlib.util

    missing = [m for m in NEEDS if importlib.util.find_spec(m) is None]
    if missing:
        sys.exit(f"error: paper_dryrun: missing package(s) {', '.join(missing)}: pip install them")


def main(argv: list[str] | None = None) -> dict:
    # 1. Arguments, device, per-device defaults.
    check_imports()
    args = parse_args(argv)
    import torch

    from magicseg.core.config import parse_params
    from magicseg.core.templates import TEMPLATES
    from magicseg.core.vocabulary import build_vocabulary

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("error: --device cuda: CUDA is not available here")
    gpu = device.type == "cuda"
    arch = ARCHS["tiny" if args.tiny else "paper"]
    args.repeats = args.repeats or (2 if gpu else 1)
    args.train_steps = args.train_steps or (3 if gpu else 1)
    t_start = time.perf_counter()

    # 2. The paper profile, and the overrides a dry run needs (printed).
    raw = paper_params()
    full = parse_params(raw, "paper profile")
    names = arch["names"]
    overrides: dict[str, object] = {
        "generate.diffusers.checkpoint": f"<random {names['sd']}>",
        "generate.diffusers.device": device.type,
        "label.grounded_sam.detector_checkpoint": f"<random {names['gdino']}>",
        "label.grounded_sam.sam_checkpoint": f"<random {names['sam']}>",
        "label.grounded_sam.device": device.type,
        "label.grounded_sam.box_threshold": 0.0,
        "label.grounded_sam.text_threshold": 0.0,
        "train.clip.checkpoint": f"<random {names['clip']}, saved to a temporary directory>",
        "train.device": device.type,
    }
    if args.steps or not gpu:
        overrides["generate.diffusers.steps"] = args.steps or 2
    if args.pairs or not gpu:
        overrides["generate.batch_size"] = args.pairs or 1
    if args.train_batch or not gpu:
        overrides["train.batch_size"] = args.train_batch or 2
    if args.counterfactual_mode:
        overrides["generate.diffusers.counterfactual_mode"] = args.counterfactual_mode
        if args.counterfactual_mode == "inpaint":  # repaints from the positive's own noise
            overrides["generate.diffusers.pair_noise"] = "shared"
    if not gpu and full.generate.diffusers.dtype == "float16":
        overrides["generate.diffusers.dtype"] = "auto"  # fp16 kernels are a GPU's (fp32 here)
    if args.tiny:
        overrides |= {
            "generate.height": arch["image"],
            "generate.width": arch["image"],
            "train.crop": arch["crop"],
            "train.clip.templates": "single",  # 1203 texts, not 15 x 1203: seconds, not a minute
            # the tiny CLIP's joint dim (the atm decoder works in it, use_proj=False)
            "train.clip.decoder_dim": arch["clip_projection"],
            "train.clip.decoder_heads": 2,
        }
    tmp_dir = tempfile.TemporaryDirectory(prefix="magicseg-dryrun-")
    tmp = Path(tmp_dir.name)
    data = json.loads(json.dumps(raw))
    for key, value in overrides.items():
        *path, last = key.split(".")
        node = data
        for p in path:
            node = node[p]
        node[last] = str(tmp / "clip") if key == "train.clip.checkpoint" else value
    params = parse_params(data, "paper profile + dry-run overrides")
    v = params.vocabulary
    vocab = build_vocabulary(
        v.source,
        holdout_combination=v.holdout_combination,
        holdout_novel_words=v.holdout_novel_words,
    )
    records = make_records(params, vocab, params.generate.batch_size)
    print(
        f"paper_dryrun: {'tiny' if args.tiny else 'paper'} sizes on {device} "
        f"({torch.get_num_threads()} CPU threads), torch {torch.__version__}"
    )
    for key, value in overrides.items():
        print(f"  override {key}: {value}")

    # 3. The synthetic tokenizer, checked: every word known, realistic lengths.
    texts = [*vocab.display, *(t for r in records for t in (r.prompt, r.cf_prompt))]
    texts += [*TEMPLATES[params.train.clip.templates]]
    write_wordpiece(tmp / "wordpiece", texts)
    tok_bert = load_tokenizer(tmp / "wordpiece", 256)  # Grounding DINO's text limit
    tok_clip = load_tokenizer(tmp / "wordpiece", 77, text_inputs_only=True)
    prompt_tokens = [len(tok_clip(r.prompt, truncation=True)["input_ids"]) for r in records]
    unk = sum(tok_bert(t)["input_ids"].count(tok_bert.unk_token_id) for t in texts)
    name_tokens = [len(tok_bert(n, add_special_tokens=False)["input_ids"]) for n in vocab.display]
    tokens = {
        "vocabulary": len(tok_bert),
        "unknown_tokens": unk,
        "prompt_tokens_mean": sum(prompt_tokens) / len(prompt_tokens),
        "prompt_tokens_max": max(prompt_tokens),
        "class_name_tokens_mean": sum(name_tokens) / len(name_tokens),
    }
    print(f"  tokenizer: {tokens}")
    if unk:
        raise RuntimeError(f"synthetic tokenizer: {unk} unknown tokens")

    # 4. The stages, one at a time (each one's models freed before the next).
    gen_stage, pairs = run_generate_stage(
        args, arch, params, records, tok_clip, device, full.generate.diffusers.steps
    )
    label_stage, results = run_label_stage(
        args, arch, params, records, pairs, tok_bert, vocab, device
    )
    train_stage = run_train_stage(
        args, arch, params, records, pairs, results, tok_clip, vocab, device, tmp
    )
    tmp_dir.cleanup()
    label_stage.facts["caption_tokens_mean"] = sum(label_stage.facts["caption_tokens"]) / len(
        label_stage.facts["caption_tokens"]
    )

    # 5. Extrapolation to the paper's run, the table, the JSON.
    pairs_total = full.prompts.requests * full.prompts.per_request
    n = len(records)
    hours = {
        "generate": pairs_total * gen_stage.facts["run_at_profile_steps_s"] / n / 3600,
        "label": pairs_total * label_stage.best("run") / n / 3600,
        "train": (
            full.train.steps
            * train_stage.best("step")
            * full.train.batch_size
            / train_stage.facts["batch"]
            + train_stage.best("text_features")
        )
        / 3600,
    }
    stages = [gen_stage, label_stage, train_stage]
    report = {
        "device": torch.cuda.get_device_name(device) if gpu else f"cpu ({os.cpu_count()} cores)",
        "sizes": "tiny" if args.tiny else "paper",
        "torch": torch.__version__,
        "overrides": {k: str(v) for k, v in overrides.items()},
        "tokenizer": tokens,
        "stages": {
            s.name: {
                "seconds": {k: [round(x, 3) for x in v] for k, v in s.seconds.items()},
                "peak_rss_gib": round(s.peak_rss / 2**30, 2),
                "peak_cuda_gib": round(s.peak_cuda / 2**30, 2) if gpu else None,
                "params": s.params,
                "facts": s.facts,
                "paper_run_device_hours": round(hours[s.name], 3),
            }
            for s in stages
        },
        "paper_run": {
            "pairs": pairs_total,
            "train_steps": full.train.steps,
            "train_batch": full.train.batch_size,
        },
        "total_s": round(time.perf_counter() - t_start, 1),
    }
    print_table(report, gpu)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return report


def print_table(report: dict, gpu: bool) -> None:
    """The per-stage table and how each stage was extrapolated to the paper's run."""
    unit = "GPU-h" if gpu else "CPU-h"
    stages = report["stages"]
    print(f"\n{report['device']}, {report['sizes']} sizes, torch {report['torch']}")
    head = f"{'stage':9s} {'build s':>8s} {'run s':>14s} {'peak RSS':>9s} {'peak CUDA':>10s}"
    print(f"{head} {'params':>8s} {'paper run':>12s}")
    for name, s in stages.items():
        runs = s["seconds"].get("run") or s["seconds"].get("step")
        run = "/".join(f"{x:.1f}" for x in runs)
        cuda = f"{s['peak_cuda_gib']:.1f} GiB" if gpu else "-"
        params = sum(v for k, v in s["params"].items() if k not in ("trained", "prompt_tokens"))
        print(
            f"{name:9s} {s['seconds']['build'][0]:8.1f} {run:>14s} {s['peak_rss_gib']:5.1f} GiB "
            f"{cuda:>10s} {params / 1e6:7.0f}M {s['paper_run_device_hours']:8.1f} {unit}"
        )
    run, g, t = report["paper_run"], stages["generate"]["facts"], stages["train"]["facts"]
    text_s = stages["train"]["seconds"]["text_features"][0]
    print(
        f"run s: every timed run, the last extrapolated to the paper's run ({run['pairs']} pairs, "
        f"{run['train_steps']} steps of batch {run['train_batch']}):\n"
        f"  generate: {g['pairs']} pair(s) per run at {g['steps']} steps "
        f"(UNet {g['unet_s']:.1f}s of the last, {g['unet_calls']} calls) -> "
        f"{g['run_at_profile_steps_s']:.1f}s at {g['profile_steps']} steps "
        f"(+ {g['unet_call_s']:.2f}s per extra UNet call)\n"
        f"  label: {stages['label']['facts']['pairs']} pair(s) per run, counterfactual check "
        f"{'on' if stages['label']['facts']['cf_check'] else 'off'}, "
        f"{stages['label']['facts']['boxes_per_image']:.0f} boxes per image\n"
        f"  train: one step of batch {t['batch']} (x {run['train_batch']}/{t['batch']}), plus "
        f"the text features of {t['vocabulary']} classes x {t['templates']} once ({text_s:.1f}s)"
    )
    print(f"total {report['total_s']:.0f}s")


if __name__ == "__main__":
    main()

"""Typed, validated parameters: one frozen class per ``params.yaml`` section.

``load_params(path)`` reads the whole file and validates every section before any stage does
work, so a typo in ``train`` fails the ``vocabulary`` stage too, in one line that names the key:

    params.yaml: train.num_sampled: must be >= 1 (got 0)

Backend-specific settings live in a nested block named after the backend (``generate.diffusers``,
``label.grounded_sam``, ...); only the block of the selected backend is used.
"""

from __future__ import annotations

import json
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from magicseg.core.errors import ConfigError


class Section(BaseModel):
    """Base of every params class: frozen, unknown keys refused."""

    model_config = ConfigDict(
        extra="forbid", frozen=True, protected_namespaces=(), use_attribute_docstrings=True
    )


# --------------------------------------------------------------------------------------------
# vocabulary
# --------------------------------------------------------------------------------------------
class VocabularyParams(Section):
    source: Literal["procedural", "lvis", "coco", "voc", "context", "file"] = "procedural"
    """Built-in vocabulary or `file`."""
    file: str | None = None
    """A text file with one class name per line (``source: file``)."""
    holdout_combination: int = Field(16, ge=0)
    """Classes held out of training (never prompted) whose words are all seen in other training
    classes ("teal heart" with teal and heart seen apart): open-vocabulary transfer to new
    combinations. Chosen by the global seed; ``evaluate`` reports them apart."""
    holdout_novel_words: int = Field(2, ge=0)
    """Words held out of training with every class that contains them ("bowtie": every bowtie):
    open-vocabulary transfer to an unseen word. Chosen by the global seed; ``evaluate`` reports
    these classes apart."""
    limit: int | None = Field(None, ge=1)
    """Keep only the first ``limit`` classes (quick experiments on big vocabularies)."""
    holdout_seed: int | None = Field(None, ge=0)
    """Seed of the held-out draw; null = the global ``seed``. A number keeps the held-out
    classes (and so the trainable ones) fixed while ``seed`` re-draws prompts, data and
    training: a spread over seeds then measures those alone."""

    def holdout_seed_for(self, seed: int) -> int:
        """The seed the held-out classes are drawn with, given the global ``seed``."""
        return seed if self.holdout_seed is None else self.holdout_seed

    @model_validator(mode="after")
    def _file_needs_path(self) -> VocabularyParams:
        if self.source == "file" and not self.file:
            raise ValueError("file: required when source is 'file'")
        return self


# --------------------------------------------------------------------------------------------
# prompts
# --------------------------------------------------------------------------------------------
class OpenAIWriterParams(Section):
    llm: str = "gpt-4o-mini"
    """Model name on the server (``model`` of the chat-completions request)."""
    base_url: str | None = None
    """OpenAI-compatible server (vLLM, Ollama, llama.cpp); null = api.openai.com."""
    api_key_env: str = "OPENAI_API_KEY"
    """Environment variable that holds the API key (never put the key itself here)."""
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    max_tokens: int = Field(2048, ge=16)
    concurrency: int = Field(4, ge=1, le=256)
    """Requests in flight at once."""
    max_retries: int = Field(6, ge=0)
    timeout_s: float = Field(60.0, gt=0)
    llm_counterfactual: bool = False
    price_per_1k_input: float = Field(0.0, ge=0)
    price_per_1k_output: float = Field(0.0, ge=0)


class TransformersWriterParams(Section):
    checkpoint: str = "Qwen/Qwen2.5-1.5B-Instruct"
    """Instruction-tuned causal LM (with a chat template): hub id or local directory."""
    batch_size: int = Field(4, ge=1)
    temperature: float = Field(0.9, gt=0.0, le=2.0)
    top_p: float = Field(0.95, gt=0.0, le=1.0)
    max_new_tokens: int = Field(1024, ge=16)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: str = "auto"


class PromptsParams(Section):
    writer: Literal["template", "openai", "transformers"] = "template"
    """Prompt writer: offline templates, an OpenAI-compatible API, or a local LLM."""
    style: Literal["rich", "plain"] = "rich"
    """``rich``: busy scene descriptions; ``plain``: "a photo of a {class}" (paper's ablation)."""
    requests: int = Field(300, ge=1)
    """How many requests; each picks its 1-2 classes and asks for ``per_request`` prompts."""
    per_request: int = Field(10, ge=1, le=100)
    """Descriptions asked per request (10 in the paper)."""
    two_class_fraction: float = Field(0.3, ge=0.0, le=1.0)
    """Share of requests that pick two classes instead of one."""
    class_names: Literal["display", "full"] = "display"
    """The class names written into the LLM request, the "nothing" rewrite and the detector's
    caption (the manifests' ``class_names``): ``display`` drops an LVIS disambiguation ("yoke
    (animal equipment)" -> "yoke"), ``full`` keeps it as the published code does (a
    description is then kept when it names the full name or its display form, and the rewrite
    replaces both)."""
    cf_rewrite: Literal["ours", "literal"] = "ours"
    """Counterfactual prompt: ``ours`` replaces every mention of a class by "nothing", plurals,
    possessives and a leading article or count word included ("two dogs" -> "nothing");
    ``literal`` is the published rewrite: each class name, whole word, case-insensitive,
    replaced by "nothing" and nothing else ("two dogs" stays, "a dog" -> "a nothing")."""
    openai: OpenAIWriterParams = OpenAIWriterParams()
    transformers: TransformersWriterParams = TransformersWriterParams()


# --------------------------------------------------------------------------------------------
# generate
# --------------------------------------------------------------------------------------------
class ProceduralGeneratorParams(Section):
    drift: float = Field(0.2, ge=0.0, le=1.0)
    """How far the counterfactual drifts from the positive besides the removed object:
    noise, a colour/lighting shift and re-drawn distractors all grow with it."""
    distractors: int = Field(4, ge=0, le=32)
    """Unlabelled clutter objects in a rich scene (plain prompts get none)."""
    plain_counterfactual: Literal["void", "scene"] = "void"
    """What the counterfactual of a plain prompt ("a photo of a red kite" -> "a photo of
    nothing") shows: ``void``, a blank or noisy void, as Stable Diffusion paints "a photo of
    nothing"; ``scene``, the positive's plain scene without its objects. Prompts whose
    counterfactual still describes a scene keep it either way."""


class DiffusersGeneratorParams(Section):
    checkpoint: str = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    """Any diffusers text-to-image checkpoint of a supported family: hub id or local directory."""
    family: Literal["auto", "sd", "sdxl", "sd3", "flux", "flux2"] = "auto"
    """Model family: ``auto`` detects it from the pipeline class (``model_index.json``); a named
    family must match the checkpoint's (``sd``: SD 1.x/2.x/SD-Turbo, ``sdxl``: SDXL and
    SDXL-Turbo, ``sd3``: SD 3/3.5, ``flux``: FLUX.1, ``flux2``: FLUX.2 and FLUX.2 [klein])."""
    accept_noncommercial: bool = False
    """A checkpoint under a non-commercial licence (FLUX.1-dev, FLUX.2-dev, FLUX.2-klein-9B,
    SDXL-Turbo, ...) is refused unless this is true: setting it says you accept its terms."""
    scheduler: Literal["dpm++", "unipc", "ddim", "euler", "euler_a", "pndm", "default"] = "dpm++"
    steps: int = Field(20, ge=1, le=1000)
    """Denoising steps."""
    guidance: float = Field(7.5, ge=0.0)
    """Classifier-free guidance scale (0 disables the unconditional rows)."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: str = "auto"
    negative_prompt: str = ""
    compile: bool = False
    safety_checker: bool = False
    """Off by default: it blacks out flagged images, silently poisoning a segmentation set."""
    attention_slicing: bool = False
    images_per_call: Annotated[int, Field(ge=1)] | Literal["auto"] = "auto"
    """Images per pipeline call, positives and counterfactuals counted apart (a UNet step sees
    2x this many rows with guidance). ``auto``: the whole ``generate.batch_size`` (all pairs in
    one call), at most 32 images on a GPU and 8 on a CPU (benchmarks/generate.py: 8 images per
    call 1.7x the naive loop's pairs/s on 2 CPU cores, 2.9x on loaded ones)."""
    pair_noise: Literal["shared", "independent"] = "shared"
    """Initial noise of a pair: ``shared`` (the counterfactual starts from the positive's
    latents, seeded by the record's seed) or ``independent`` (as published: the counterfactual
    from other noise, still reproducible: seeded by the stream ``generate.cf_noise`` of the
    record's seed). ``independent`` needs ``counterfactual_mode: prompt_swap``."""
    counterfactual_mode: Literal["prompt_swap", "inpaint"] = "prompt_swap"
    """``prompt_swap``: the counterfactual painted from its own prompt and the positive's
    noise. ``inpaint``: the positive's object region (its class words' cross-attention during
    the positive's denoising, thresholded and dilated) repainted from the counterfactual prompt
    with the same noise and pasted back: outside the region (``cf_region/<id>.png``) the
    counterfactual is the positive, byte for byte."""
    inpaint_checkpoint: str | None = None
    """``inpaint``: a dedicated inpainting checkpoint (hub id or local directory); null
    repaints with the text-to-image model's own components."""
    inpaint_threshold: float = Field(0.4, gt=0.0, lt=1.0)
    """``inpaint``: a pixel is the object where its class's attention map, min-max normalised
    over the image, exceeds this (several classes: the union)."""
    inpaint_dilate: int = Field(8, ge=0)
    """``inpaint``: pixels the object region grows by (a disk) before it is repainted."""

    @model_validator(mode="after")
    def _independent_needs_prompt_swap(self) -> DiffusersGeneratorParams:
        if self.pair_noise == "independent" and self.counterfactual_mode != "prompt_swap":
            raise ValueError(
                "pair_noise: independent needs counterfactual_mode prompt_swap (inpaint "
                "repaints the positive from its own noise)"
            )
        return self


class GenerateParams(Section):
    backend: Literal["procedural", "diffusers"] = "procedural"
    """Pair generator: `procedural` (offline, CPU) or `diffusers` (Stable Diffusion)."""
    height: int = Field(64, ge=16, le=4096)
    width: int = Field(64, ge=16, le=4096)
    batch_size: int = Field(64, ge=1)
    """Prompts per generator call (pairs share their seeds whatever the batch)."""
    image_format: Literal["png", "jpeg"] = "png"
    """File format of the positives and counterfactuals: ``png`` (lossless) or ``jpeg`` (PIL's
    default quality 75, as published). Masks stay PNG; every reader follows the manifest's
    paths."""
    procedural: ProceduralGeneratorParams = ProceduralGeneratorParams()
    diffusers: DiffusersGeneratorParams = DiffusersGeneratorParams()

    @model_validator(mode="after")
    def _size_multiple_of_8(self) -> GenerateParams:
        if self.backend == "diffusers":
            for key in ("height", "width"):
                if getattr(self, key) % 8:
                    raise ValueError(
                        f"{key}: must be a multiple of 8 for diffusers (got {getattr(self, key)})"
                    )
        return self


# --------------------------------------------------------------------------------------------
# label
# --------------------------------------------------------------------------------------------
class DifferenceLabelerParams(Section):
    threshold: float = Field(0.12, gt=0.0, lt=1.0)
    """Per-pixel |positive - counterfactual| (max over RGB, in [0, 1]) above which a pixel
    belongs to the object, after removing the global colour shift."""
    open_radius: int = Field(1, ge=0, le=8)
    close_radius: int = Field(1, ge=0, le=8)
    min_component: int = Field(6, ge=0)
    """Connected components smaller than this many pixels are dropped."""


class GroundedSamParams(Section):
    detector_checkpoint: str = "IDEA-Research/grounding-dino-tiny"
    """Detector checkpoint, hub id or local directory: Grounding DINO or MM-Grounding-DINO
    (LLMDet checkpoints are MM-Grounding-DINO models), told apart by its config's model type."""
    sam_checkpoint: str = "facebook/sam-vit-huge"
    """Mask segmenter checkpoint, hub id or local directory: SAM or SAM 2.1 (by model type)."""
    box_threshold: float = Field(0.3, ge=0.0, le=1.0)
    text_threshold: float = Field(0.25, ge=0.0, le=1.0)
    box_score: Literal["class", "all"] = "class"
    """What a box's probability must pass ``box_threshold`` on: ``class``, the maximum over
    its class's own tokens (and ``text_threshold`` too); ``all``, as the published code, the
    maximum over every caption token (separators and special tokens included). Either way the
    box takes the class whose tokens score highest."""
    nms_iou: float = Field(0.5, gt=0.0, le=1.0)
    """Per-class NMS: a box overlapping a better box of its class by more is dropped."""
    max_detections: int = Field(20, ge=1)
    """Most boxes kept per image after NMS (the best-scoring), so a degenerate image cannot
    send hundreds of boxes to SAM."""
    batch_size: int = Field(4, ge=1)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: str = "auto"
    cf_check: bool = True
    """Also run the detector on the counterfactual image and record whether the class is
    still found there."""


class Sam3Params(Section):
    checkpoint: str = "facebook/sam3"
    """SAM 3 checkpoint (``Sam3Model``): hub id or local directory."""
    accept_licence: bool = False
    """SAM 3's weights are gated under the SAM License (not an open-source licence): set true
    to state that you accepted it; the labeler and the pre-flight refuse SAM 3 without."""
    score_threshold: float = Field(0.3, ge=0.0, le=1.0)
    """An instance is kept when its score (query probability x presence probability) is
    above this."""
    mask_threshold: float = Field(0.5, gt=0.0, lt=1.0)
    """Mask probability above which a pixel belongs to an instance."""
    max_detections: int = Field(20, ge=1)
    """Most instances kept per image (the best-scoring, over all its classes)."""
    cf_presence_threshold: float = Field(0.5, ge=0.0, le=1.0)
    """The counterfactual check: a class whose presence score on the counterfactual image is
    above this is flagged as still there (``cf_detected``)."""
    batch_size: int = Field(4, ge=1)
    """(image, class) prompts per forward pass (one image embedding per image)."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: str = "auto"
    cf_check: bool = True
    """Also score the counterfactual image's presence for each class."""


class GroundedProxyParams(Section):
    bleed: float = Field(0.2, ge=0.0, le=1.0)
    """Probability, per detected object, that its mask bleeds into the background of a loosened
    box (the box grown by up to ``bleed_margin`` of its size on each side)."""
    bleed_margin: float = Field(0.4, gt=0.0, le=2.0)
    """Largest growth of a bleeding box on each side, as a fraction of its width or height."""
    miss: float = Field(0.2, ge=0.0, le=1.0)
    """Probability, per detected object, that a part of it is missed (cut off along a random
    line)."""
    miss_share: float = Field(0.5, gt=0.0, lt=1.0)
    """Largest share of an object's pixels a miss cuts off (drawn uniformly from 0.1 up)."""
    clutter: float = Field(0.2, ge=0.0, le=1.0)
    """Probability, per image, of one false detection: a salient region of the background
    (clutter, texture) segmented and taken for one of the prompt's classes."""
    confusion: float = Field(0.5, ge=0.0, le=1.0)
    """Probability that a detected object is given another class of the prompt, times the
    share of words the two names have in common ("red heart" vs "red star": 1/3). Classes of
    the same colour cannot be told apart by this labeler at all: each of their objects goes to
    one of them at random."""
    tolerance: float = Field(70.0, gt=0.0, le=255.0)
    """Perception: RGB distance within which a pixel, under the fitted lighting, shows a colour
    of a class name (its colour word, or a striped or dotted class's pattern shade)."""
    seed: int = 0
    """Seed of the error draws; each sample's draws depend on this and its id alone."""
    cf_check: bool = True
    """Also look for the classes in the counterfactual image (``cf_detected``) and compare the
    foreground with the counterfactual difference (``cf_agreement``), as ``grounded_sam``."""


class LabelParams(Section):
    backend: Literal["grounded_proxy", "difference", "oracle", "grounded_sam", "sam3"] = (
        "grounded_proxy"
    )
    """Labeler: `grounded_proxy` (offline stand-in for Grounded-SAM: the positive alone, with
    its kinds of errors), `difference` (model-free, from the counterfactual), `oracle` (renderer
    masks), `grounded_sam` (a text-prompted detector + SAM), `sam3` (SAM 3 alone: text in,
    instance masks out)."""
    grounded_proxy: GroundedProxyParams = GroundedProxyParams()
    difference: DifferenceLabelerParams = DifferenceLabelerParams()
    grounded_sam: GroundedSamParams = GroundedSamParams()
    sam3: Sam3Params = Sam3Params()


# --------------------------------------------------------------------------------------------
# filter
# --------------------------------------------------------------------------------------------
class FilterParams(Section):
    enabled: bool = True
    """``false`` switches the filter off: every sample with a mask is kept (only ``unreadable``
    and ``no_detection`` ones are dropped), the other reasons recorded as flags."""
    min_area: float = Field(0.005, ge=0.0, le=1.0)
    """Smallest object area (all classes together) as a fraction of the image."""
    max_area: float = Field(0.6, ge=0.0, le=1.0)
    max_components: int = Field(3, ge=1)
    """Most connected components per class."""
    max_ignore: float = Field(0.05, ge=0.0, le=1.0)
    """Largest share of ignore-labelled pixels."""
    min_score: float = Field(0.0, ge=0.0, le=1.0)
    """Lowest detection score (labelers that score)."""
    min_cf_agreement: float = Field(0.0, ge=0.0, le=1.0)
    """Lowest IoU between the labeler's mask and the counterfactual-difference mask
    (0 switches the check off)."""
    drop_cf_detected: bool = True
    """Drop samples whose class is still detected in the counterfactual (labelers that check)."""
    gallery_samples: int = Field(8, ge=0, le=64)
    """Examples of kept and of dropped samples drawn in the gallery plot."""

    @model_validator(mode="after")
    def _area_order(self) -> FilterParams:
        if self.min_area >= self.max_area:
            raise ValueError(f"min_area: must be < max_area ({self.min_area} >= {self.max_area})")
        return self


# --------------------------------------------------------------------------------------------
# pretrain
# --------------------------------------------------------------------------------------------
class PretrainParams(Section):
    """The miniature of CLIP's web pretraining (stage ``pretrain``, :mod:`magicseg.miniclip`):
    a procedural image-caption corpus and an image tower trained against the frozen MiniLM text
    tower. Its own seed: the global ``seed`` only picks the held-out classes it is scored on."""

    seed: int = Field(0, ge=0)
    """Seed of the corpus, the test images and the initialisation (not the global seed, so a
    seed ablation reuses the committed checkpoint)."""
    images: int = Field(12000, ge=1)
    """Corpus images (one catalogue object each, classes cycled so every class gets the same
    share, the held-out ones included)."""
    test_images: int = Field(1260, ge=1)
    """Images of the zero-shot test (own seeds; classes cycled)."""
    size: int = Field(64, ge=16)
    """Image side in pixels (a multiple of 8: the tokens are at stride 8)."""
    plain_fraction: float = Field(0.3, ge=0.0, le=1.0)
    """Share of plain backgrounds; the rest get a textured scene with clutter."""
    distractors: int = Field(4, ge=0, le=32)
    """Most clutter objects in a scene image (uniform from 0)."""
    stem_width: int = Field(24, ge=4)
    """Channels of the first conv stage (doubled by the second)."""
    width: int = Field(96, ge=8)
    """Token width of the transformer layers."""
    layers: int = Field(2, ge=1, le=12)
    """Transformer layers over the stride-4 token grid (each takes deep prompt tokens later)."""
    heads: int = Field(4, ge=1)
    mlp_ratio: int = Field(2, ge=1)
    steps: int = Field(1500, ge=1)
    batch_size: int = Field(64, ge=2)
    lr: float = Field(2e-3, gt=0)
    """Peak AdamW learning rate (linear warm-up, cosine decay to 5%)."""
    weight_decay: float = Field(0.05, ge=0)
    warmup_steps: int = Field(50, ge=0)
    logit_scale: float = Field(50.0, ge=1.0, le=100.0)
    """Initial temperature of the image-caption softmax (learned, at most 100): MiniLM's class
    names are close to each other (cos about 0.9 within a shape), so it must grow large."""
    dense_weight: float = Field(1.0, ge=0.0)
    """Weight of the dense (multiple-instance) caption loss beside the global one: each
    position's projected feature is scored against every caption, the scores are pooled over
    the positions (the mean of the best ``dense_top_fraction`` of them) into a second 252-way
    softmax. A caption still says only what is in the image, never where. With the global loss
    alone (0) the class ends up in the background positions: in a 1,000-step calibration,
    object positions classified alone 2.5% right (the text of the image's class was closer to
    its background positions, cos 0.34, than to its object, 0.11); with it 65%."""
    dense_top_fraction: float = Field(0.1, gt=0.0, le=1.0)
    """Share of the positions whose mean score is an image's dense score for a caption (1 =
    the mean, as the global loss; a log-mean-exp instead gave 58% in the same calibration)."""
    precision: Literal["fp32", "bf16"] = "fp32"
    """Autocast dtype of the forward pass on the CPU."""
    num_threads: int = Field(0, ge=0)
    """torch CPU threads (0 = library default)."""

    @model_validator(mode="after")
    def _check_shapes(self) -> PretrainParams:
        if self.size % 8:
            raise ValueError(f"size: must be a multiple of 8 (got {self.size})")
        if self.width % self.heads:
            raise ValueError(f"heads: {self.heads} does not divide width {self.width}")
        return self


# --------------------------------------------------------------------------------------------
# train
# --------------------------------------------------------------------------------------------
class OfflineModelParams(Section):
    width: int = Field(32, ge=4)
    """Channels of the first U-Net level (doubled per level)."""
    depth: int = Field(3, ge=1, le=5)
    embed_dim: int = Field(64, ge=8)
    text_encoder: str = "minilm"


class MiniZegModelParams(Section):
    backbone: str = "pretrained/miniclip"
    """The frozen miniature CLIP (the ``pretrain`` stage's output directory or its model.pt)."""
    text_encoder: str = "minilm"
    """Must be the text tower the backbone was pretrained against."""
    vpt_tokens: int = Field(4, ge=0)
    """Deep prompt tokens before each of the tower's transformer layers (0 = none)."""
    residual_hidden: int = Field(256, ge=0)
    """Hidden width of the zero-initialised residual head added to the frozen text-aligned
    projection of the dense features (0 = the frozen projection alone)."""
    decoder_layers: int = Field(2, ge=0)
    """Transformer decoder layers refining the class text queries against the dense features
    (their correction starts at zero; 0 = the text embeddings themselves score the pixels)."""
    decoder_heads: int = Field(4, ge=1)
    decoder_dim: int = Field(128, ge=8)


class ClipModelParams(Section):
    checkpoint: str = "openai/clip-vit-base-patch16"
    """CLIP (or SigLIP) checkpoint: hub id or local directory; its vision tower is frozen."""
    vpt_tokens: int = Field(10, ge=0)
    vpt_style: Literal["plain", "zegclip"] = "plain"
    """Deep visual prompts: ``plain`` (learned tokens inserted as they are, HF position
    interpolation) or ``zegclip`` (the published backbone's forward: prompts through a shared
    trainable Linear and dropout 0.1, a trainable LayerNorm on the last layer's tokens, positions
    bilinearly interpolated, the CLS token with the class embedding added twice, as written).
    Both put prompts before every layer (the published ``total_d_layer: 11`` = 1 + 11 layers)."""
    image_norm: Literal["model", "imagenet"] = "model"
    """Input normalisation: ``model`` (the tower's own statistics: CLIP's, or SigLIP's) or
    ``imagenet`` (mean 0.485/0.456/0.406, std 0.229/0.224/0.225: the published ``img_norm_cfg``,
    which the published code applies to CLIP). Stored in the checkpoint, used at inference."""
    decoder: Literal["query", "atm"] = "query"
    """Decoder head: ``query`` (class queries + a learned background query, self- and
    cross-attention, Mask2Former-style mask embedding) or ``atm`` (the published ZegCLIP ATM
    decoder: queries from the class text x CLS relationship descriptor, masks = the last layer's
    cross-attention logits over the patch tokens, SegLossPlus; ``decoder_dim`` must equal
    CLIP's joint dim, background = no class mask fires). See ``magicseg.model.atm``."""
    decoder_layers: int = Field(3, ge=1)
    decoder_heads: int = Field(8, ge=1)
    decoder_dim: int = Field(512, ge=8)
    deep_supervision: bool = True
    """Mask loss on every decoder layer (true) or on the last one only (the published ATM)."""
    resolution: int | None = Field(None, ge=16)
    """Input resolution the pretrained position grid is first resized to (``vpt_style:
    zegclip``, the published ``input_resolution``); null = ``train.crop`` (the tower's own
    image size without a crop). Stored in the checkpoint."""
    focal_weight: float = Field(100.0, ge=0)
    dice_weight: float = Field(1.0, ge=0)
    loss_stride: int = Field(4, ge=1)
    """The mask loss is computed at 1/``loss_stride`` of the crop (target nearest-downsampled);
    1 = full resolution, as published (memory grows with the square of it)."""
    templates: Literal["zegclip15", "single"] = "zegclip15"


class TrainParams(Section):
    """The one training loop's settings (:mod:`magicseg.training`). What differs between models
    (schedule, warm-up, lr multiplier, weight-decay rule, crop, validation batch, precision)
    is a param here with a per-profile default, never a branch on the architecture."""

    architecture: Literal["minizeg", "offline", "clip"] = "minizeg"
    """Segmenter trained: `minizeg` (ZegCLIP in miniature: the frozen pretrained miniature CLIP
    with deep prompts and a text-query decoder), `offline` (small U-Net trained from scratch +
    MiniLM) or `clip` (CLIP ViT with deep visual prompts); its settings are the block of the
    same name."""
    steps: int = Field(1000, ge=1)
    """Optimiser steps."""
    batch_size: int = Field(32, ge=1)
    """Images per optimiser step, all processes together (each takes its slice)."""
    lr: float = Field(3e-3, gt=0)
    """Peak learning rate (after warm-up), before ``lr_multiplier``."""
    lr_multiplier: float = Field(1.0, gt=0)
    """Multiplies ``lr`` for every trained parameter (the published recipe: 10 for the
    prompts and the head, the only parts that train; the frozen CLIP gets no updates)."""
    weight_decay: float = Field(1e-4, ge=0)
    weight_decay_rule: Literal["all", "matrices"] = "all"
    """Which trained parameters AdamW decays: ``all`` (as mmcv's AdamW did in the published
    recipe) or ``matrices`` (weights of >= 2 dimensions only: no norms, biases, tokens of 1-d)."""
    schedule: Literal["cosine", "poly"] = "cosine"
    """After warm-up: ``cosine`` decay over the remaining steps to ``min_lr_ratio`` x the peak,
    or ``poly``: mmcv's PolyLrUpdaterHook, (peak - min) x (1 - step/steps)^poly_power + min
    over all steps (warm-up scales it)."""
    poly_power: float = Field(0.9, gt=0)
    """Exponent of ``schedule: poly``."""
    min_lr_ratio: float = Field(0.05, ge=0.0, le=1.0)
    """The schedule's floor as a fraction of each parameter's peak lr (the published min_lr
    1e-6 of a peak 2e-5 x 10 is 0.005)."""
    warmup: Annotated[int, Field(ge=0)] | Annotated[str, Field(pattern=r"^\d+(\.\d+)?%$")] = "5%"
    """Linear warm-up length: steps (``1500``) or a share of ``steps`` (``"5%"``); 0 = none."""
    warmup_ratio: float = Field(0.02, ge=0.0, le=1.0)
    """The lr factor at step 0 of the warm-up, rising linearly to 1 (mmcv's ``warmup_ratio``)."""
    crop: int | None = Field(None, ge=16)
    """Random resize (``scale_range``) then a random ``crop`` x ``crop`` window, padded with
    ignore; null = train at the data's size (horizontal flips only)."""
    scale_range: tuple[float, float] = (0.5, 2.0)
    """Random resize factors before the crop (with ``crop`` only)."""
    photometric: bool = False
    """Random brightness, contrast and saturation (each with probability 0.5), the same for an
    image and its counterfactual."""
    num_sampled: int = Field(40, ge=1)
    """Classes scored per image: its own first, then random others (category random sampling).
    The offline default is 20% of the 204 trainable classes (the paper: 100 of 1203, 8%); more
    than the trainable classes uses them all (with a one-line warning)."""
    cf_weight: float = Field(0.0, ge=0)
    """Weight of the counterfactual loss (``cf_loss``); 0 = off. Off in the offline default:
    over 3 seeds it neither helped nor hurt there (see the README's Ablations), and it costs
    the counterfactual pass; the paper profile uses 1 (``hinge_head``)."""
    cf_loss: Literal["hinge_head", "hinge_pixels", "cf_background", "text_margin"] = "cf_background"
    """Form of the counterfactual loss (see :mod:`magicseg.model.losses` and the README; the
    literal pixel-feature hinge can fight the pixel objective). ``cf_background`` and
    ``hinge_pixels`` pass the counterfactual through the whole model (about twice the compute
    per step), the other two through the image encoder only."""
    cf_margin: float = Field(0.2, ge=0.0, le=2.0)
    """Margin of ``cf_loss: text_margin`` (cosine units)."""
    cf_fraction: float = Field(0.25, gt=0.0, le=1.0)
    """Share of each batch whose counterfactual is passed and scored (positions spread evenly
    over the global batch): the counterfactual pass at lower cost (offline: 0.25, chosen with
    ``benchmarks/train_levers.py``)."""
    bg_weight: float = Field(0.1, gt=0)
    """Cross-entropy weight of the background class."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """Autocast dtype of the forward pass: ``bf16`` (CPU or CUDA; weights, optimiser and losses
    stay fp32; on a CPU without AVX-512 BF16 or AMX it is emulated and slower: use fp32),
    ``fp32``, or ``auto`` (bf16 on CUDA, fp32 elsewhere: CPU bf16 kernels differ between
    instruction sets, so a CPU model trained in bf16 differs between machines). Offline
    default ``auto``: on a 2-core CPU without bf16 the ``minizeg`` step took 12.2 s in bf16
    against 1.1 s in fp32 (its attention and matmuls; the U-Net's convolutions had gained from
    bf16)."""
    deterministic: bool = False
    """``torch.use_deterministic_algorithms(True)`` for the run (an op without a deterministic
    kernel then raises, naming it; on CUDA ``CUBLAS_WORKSPACE_CONFIG`` is set to ``:4096:8``
    where unset)."""
    ema: float | None = Field(None, gt=0.0, lt=1.0)
    """Decay of an exponential moving average of the trained weights (and float buffers),
    updated after every step with the warm-up decay min(ema, (1 + t) / (10 + t)); validation
    and the saved model use the averaged weights. null = none."""
    channels_last: bool = True
    """Model and images in channels-last memory layout (faster convolutions on CPUs)."""
    compile: bool = False
    """``torch.compile`` the model (needs a C++ compiler; the first steps compile)."""
    num_workers: int = Field(0, ge=0)
    """DataLoader worker processes reading and augmenting samples (0: in the training process);
    pinned memory on CUDA."""
    checkpoint_every: int = Field(100, ge=1)
    """Steps between resumable training states (and at the end), kept under the stage's state
    directory (``.cache/magicseg/train/<run key>``), which ``dvc repro`` does not delete."""
    val_fraction: float = Field(0.05, ge=0.0, lt=1.0)
    """Share of the samples held out of training for validation (by a hash of the id)."""
    val_samples: int = Field(128, ge=1)
    """A fixed, seeded subset of the validation split scored at each validation (shared over
    the processes, confusion matrices summed)."""
    val_batch_size: int = Field(64, ge=1)
    """Validation images per forward pass and process."""
    val_num_sampled: int | None = Field(None, ge=1)
    """Classes each validation image is scored against: its own first, then seeded random
    others; null = every vocabulary class (as ``evaluate`` does)."""
    val_every: int = Field(250, ge=1)
    """Steps between validation mIoU measurements (and always after the last step)."""
    device: str = "auto"
    logger: Literal["dvclive", "wandb", "none"] = "dvclive"
    log_every: int = Field(25, ge=1)
    num_threads: int = Field(0, ge=0)
    """torch CPU threads (0 = library default)."""
    minizeg: MiniZegModelParams = MiniZegModelParams()
    offline: OfflineModelParams = OfflineModelParams()
    clip: ClipModelParams = ClipModelParams()

    @model_validator(mode="after")
    def _check_ranges(self) -> TrainParams:
        lo, hi = self.scale_range
        if not 0 < lo <= hi:
            raise ValueError(f"scale_range: give 0 < low <= high (got {list(self.scale_range)})")
        if self.crop is None and self.scale_range != (0.5, 2.0):
            raise ValueError("scale_range: applies with train.crop only (crop is null)")
        return self

    def warmup_steps(self) -> int:
        """``warmup`` in steps (a percentage of ``steps``, rounded down; at least 1 step when
        the percentage is not 0), at most ``steps - 1``."""
        if isinstance(self.warmup, str):
            share = float(self.warmup[:-1]) / 100
            n = max(1, int(self.steps * share)) if share > 0 else 0
        else:
            n = self.warmup
        return min(n, self.steps - 1)


# --------------------------------------------------------------------------------------------
# evaluate
# --------------------------------------------------------------------------------------------
class RealDatasetParams(Section):
    enabled: bool = False
    root: str | None = None
    """The dataset's directory, in the layout of :mod:`magicseg.evaluation.datasets`."""
    limit: int | None = Field(None, ge=1)
    """Evaluate the first ``limit`` images only (quick checks); None = the whole split."""


class ContextParams(RealDatasetParams):
    protocol: Literal["pc59", "pc60_text"] = "pc59"
    """``pc59``: the 59 classes, scored without background (``context``) and with the model's
    background as a 60th class (``context60``), names encoded as ``evaluate.templates`` says;
    ``pc60_text``: the published setting, 60 text classes ("background" one of them, encoded
    like the others, every pixel scored) with the 15 ZegCLIP templates (``context60_text``)."""


class EvaluateParams(Section):
    segmenter: Literal["trained", "grounded_sam", "sam3"] = "trained"
    """What is evaluated: the trained checkpoint, or a zero-shot baseline: Grounded-SAM (the
    ``label.grounded_sam`` block) or SAM 3 (the ``label.sam3`` block)."""
    test_samples: int = Field(600, ge=1)
    """Procedural held-out test images (rendered with seeds disjoint from training); the
    procedural test set needs ``vocabulary.source: procedural``."""
    test_seed: int | None = Field(None, ge=0)
    """Seed of the procedural test set (its classes, prompts and images); null = the global
    ``seed``. A number keeps the test set fixed while ``seed`` re-draws the training."""
    test_drift: float = Field(0.2, ge=0.0, le=1.0)
    """``generate.procedural.drift`` of the procedural test set's counterfactuals."""
    batch_size: int = Field(64, ge=1)
    """Procedural test images per forward pass of the trained segmenter."""
    gallery_samples: int = Field(8, ge=0, le=64)
    """Test images drawn in the gallery plot (each test set)."""
    short_side: int = Field(448, ge=32)
    """Real datasets: each image's short side is resized to this before scoring."""
    window: int = Field(448, ge=32)
    """Real datasets: sliding-window size in pixels."""
    stride: int = Field(300, ge=1)
    """Real datasets: sliding-window stride in pixels."""
    bg_threshold: float | None = Field(None, ge=0.0, le=1.0)
    """Background wherever no class reaches this probability; null = the model's background
    class."""
    templates: tuple[str, ...] | None = None
    """Real datasets: class-name prompt templates ("a photo of a {}"), text features averaged;
    they replace the checkpoint's text encoder's own templates (never wrap them); null = the
    encoder's own (clip: its training templates, train.clip.templates; minilm: the bare
    name)."""
    voc: RealDatasetParams = RealDatasetParams()
    context: ContextParams = ContextParams()
    coco_object: RealDatasetParams = RealDatasetParams()
    lvis: RealDatasetParams = RealDatasetParams()

    def test_seed_for(self, seed: int) -> int:
        """The seed the procedural test set is drawn with, given the global ``seed``."""
        return seed if self.test_seed is None else self.test_seed

    @model_validator(mode="after")
    def _check_templates(self):
        if self.templates is not None and (
            not self.templates or any(t.count("{}") != 1 for t in self.templates)
        ):
            raise ValueError("templates: give one or more strings, each with exactly one {}")
        return self


# --------------------------------------------------------------------------------------------
# launch
# --------------------------------------------------------------------------------------------
class LaunchParams(Section):
    """How ``generate``, ``label`` and ``train`` are started (``python -m magicseg.launch``):
    the number of processes, never what they make. One process is plain ``python``."""

    processes: Annotated[int, Field(ge=1)] | Literal["auto"] = 1
    """Processes per node, one per GPU; ``auto``: the GPUs visible on the node (1 without a
    GPU). Several on a CPU run with gloo, the same code."""
    nodes: int = Field(1, ge=1)
    """Nodes of a SLURM allocation to run on (more than 1 needs ``sbatch``/``salloc``); every
    node must see the repository, its output and cache directories (a shared filesystem)."""
    launcher: Literal["torchrun", "accelerate", "srun"] = "torchrun"
    """What starts several processes: ``torchrun`` (one per node, under ``srun`` on several
    nodes), ``accelerate launch`` (likewise), or ``srun`` alone (one SLURM task per process)."""
    rdzv_endpoint: str | None = None
    """Rendezvous ``host:port``; null: a free local port on one node, the allocation's first
    node at port 29500 on several."""
    rdzv_id: str | None = None
    """Rendezvous id shared by the nodes of one launch; null: ``SLURM_JOB_ID`` (``magicseg``
    outside SLURM)."""

    @field_validator("processes", mode="before")
    @classmethod
    def _int_or_auto(cls, value: Any) -> Any:
        ok = value == "auto" or (isinstance(value, int) and not isinstance(value, bool))
        if not ok or (value != "auto" and value < 1):
            raise ValueError(f"must be an integer >= 1 or auto (got {value!r})")
        return value

    @model_validator(mode="after")
    def _check_endpoint(self) -> LaunchParams:
        if self.rdzv_endpoint is not None:
            host, _, port = self.rdzv_endpoint.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(
                    f"rdzv_endpoint: must be host:port with a port in 1..65535 "
                    f"(got {self.rdzv_endpoint!r})"
                )
        return self


# --------------------------------------------------------------------------------------------
# the whole file
# --------------------------------------------------------------------------------------------
class Params(Section):
    profile: Literal["offline", "paper", "magicseg"] = "offline"
    """Set by the Hydra profile (`dvc exp run -S profile=paper`, `-S profile=magicseg`);
    informational."""
    seed: int = Field(0, ge=0)
    """Global seed: held-out classes, prompts, sample seeds, training."""
    vocabulary: VocabularyParams = VocabularyParams()
    prompts: PromptsParams = PromptsParams()
    generate: GenerateParams = GenerateParams()
    label: LabelParams = LabelParams()
    filter: FilterParams = FilterParams()
    pretrain: PretrainParams = PretrainParams()
    train: TrainParams = TrainParams()
    evaluate: EvaluateParams = EvaluateParams()
    launch: LaunchParams = LaunchParams()


RENAMED: dict[str, str | tuple[str, ...]] = {
    "vocabulary.holdout": ("vocabulary.holdout_combination", "vocabulary.holdout_novel_words"),
    "prompts.openai.model": "prompts.openai.llm",
    "prompts.transformers.model": "prompts.transformers.checkpoint",
    "generate.diffusers.model": "generate.diffusers.checkpoint",
    "generate.diffusers.inpaint_model": "generate.diffusers.inpaint_checkpoint",
    "label.grounded_sam.detector": "label.grounded_sam.detector_checkpoint",
    "label.grounded_sam.segmenter": "label.grounded_sam.sam_checkpoint",
    "filter.gallery": "filter.gallery_samples",
    "train.model": "train.architecture",
    "train.clip.model": "train.clip.checkpoint",
    "train.clip.crop": "train.crop",
    "train.clip.lr_multiplier": "train.lr_multiplier",
    "train.clip.warmup": "train.warmup",
    "evaluate.model": "evaluate.segmenter",
    "evaluate.drift": "evaluate.test_drift",
    "evaluate.gallery": "evaluate.gallery_samples",
}
"""Old params keys -> their new names: an old key is refused with a line naming the new one
(``renamed to``), or the new ones when several keys replace it (a tuple: ``replaced by``)."""
RENAMED_VALUES: dict[tuple[str, str], str] = {("evaluate.model", "checkpoint"): "trained"}
"""(old key, old value) -> the value's new name, added to that line."""


def _check_renamed(data: dict[str, Any], source: str) -> None:
    """ConfigError ``<source>: <old key>: renamed to <new key>`` (``replaced by <new key> and
    <new key>`` for a key split in several) for the first old key found."""
    for old, new in RENAMED.items():
        *parents, leaf = old.split(".")
        node: Any = data
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and leaf in node:
            hint = RENAMED_VALUES.get((old, str(node[leaf])))
            extra = f" ({node[leaf]} is now {hint})" if hint else ""
            what = (
                f"renamed to {new}" if isinstance(new, str) else f"replaced by {' and '.join(new)}"
            )
            raise ConfigError(f"{source}: {old}: {what}{extra}")


def _format_error(err: ValidationError, source: str) -> str:
    """Turn pydantic's report into one line per problem, naming the dotted key."""
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"])
        kind = e["type"]
        if kind == "extra_forbidden":
            parent = e["loc"][:-1]
            allowed = _allowed_keys(parent)
            msg = f"unknown key (allowed: {', '.join(allowed)})"
        else:
            msg = e["msg"]
            if msg.startswith("Value error, "):
                msg = msg[len("Value error, ") :]
                # model validators put the field name first: "file: required ..."
                head, sep, rest = msg.partition(": ")
                if sep and " " not in head:
                    key = f"{key}.{head}" if key else head
                    msg = rest
            if "input" in e and kind != "model_type" and not kind.startswith("value_error"):
                msg += f" (got {e['input']!r})"
        lines.append(f"{source}: {key}: {msg}" if key else f"{source}: {msg}")
    return "; ".join(lines)


def _allowed_keys(loc: tuple) -> list[str]:
    cls: type[BaseModel] = Params
    for part in loc:
        field = cls.model_fields.get(str(part))
        if field is None or not isinstance(field.annotation, type):
            break
        if issubclass(field.annotation, BaseModel):
            cls = field.annotation
    return sorted(cls.model_fields)


def parse_params(data: dict[str, Any] | None, source: str = "params.yaml") -> Params:
    """Validate a params mapping; raise :class:`ConfigError` with a one-line message."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: must be a mapping of sections, got {type(data).__name__}")
    _check_renamed(data, source)
    try:
        return Params.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_error(err, source)) from None


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate ``params.yaml``."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: params file not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    return parse_params(data, source=str(path.name))


def params_to_dict(params: BaseModel) -> dict[str, Any]:
    """Plain-data view of a params object (for checkpoints and logs)."""
    return params.model_dump(mode="json")


_BOUNDS = (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"))


def _describe(ann: Any, metadata: Sequence[Any] = ()) -> str:
    """A type annotation in words: ``int >= 1 or auto``, ``str or null``, ``list of str``,
    ``a \\| b`` for a choice (escaped for a Markdown table)."""
    origin, args = typing.get_origin(ann), typing.get_args(ann)
    if origin is Literal:
        return " \\| ".join(str(a) for a in args)
    if origin is Annotated:  # Field(...) inside Annotated carries its bounds in .metadata
        inner = [x for m in args[1:] for x in (getattr(m, "metadata", None) or [m])]
        return _describe(args[0], [*inner, *metadata])
    if origin in (typing.Union, types.UnionType):
        parts = [a for a in args if a is not type(None)]
        text = " or ".join(_describe(a, metadata if len(parts) == 1 else ()) for a in parts)
        return text + (" or null" if len(parts) < len(args) else "")
    if origin in (tuple, list):
        return f"list of {_describe(args[0])}" if args else "list"
    text = getattr(ann, "__name__", str(ann))
    bounds = [
        f"{sym} {getattr(m, attr)}"
        for m in metadata
        for attr, sym in _BOUNDS
        if getattr(m, attr, None) is not None
    ]
    return f"{text} {', '.join(bounds)}" if bounds else text


def _default(value: Any) -> str:
    """A default as it is written in ``params.yaml``."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (tuple, list)):
        return json.dumps(list(value))
    return str(value) if value != "" else '""'


def params_reference(cls: type[BaseModel] = Params, prefix: str = "") -> list[str]:
    """Markdown table rows ``| key | default | allowed | meaning |`` for every leaf field."""
    rows = []
    for name, field in cls.model_fields.items():
        key = f"{prefix}{name}"
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            rows.extend(params_reference(ann, f"{key}."))
            continue
        doc = " ".join((field.description or "").split())
        allowed = _describe(ann, field.metadata)
        rows.append(f"| `{key}` | `{_default(field.default)}` | {allowed} | {doc} |")
    return rows


if __name__ == "__main__":
    print("| key | default (offline) | allowed | meaning |")
    print("|---|---|---|---|")
    print("\n".join(params_reference()))

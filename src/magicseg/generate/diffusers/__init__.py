"""The ``diffusers`` pair generator: diffusion positives and counterfactuals, fast.

Files: :mod:`.generator` (the :class:`DiffusersPairGenerator`), :mod:`.loading` (model source,
scheduler, device settings), :mod:`.families` (the model families, what a checkpoint is, its
licence, the params each family refuses), one file per family's latent layout (:mod:`.unet`,
:mod:`.sd3`, :mod:`.flux`, :mod:`.flux2`) and :mod:`.inpaint` (the inpainting counterfactual).

For each prompt record the positive and the counterfactual image start from **the same initial
latents**, drawn on the CPU from one generator seeded with ``PromptRecord.seed``; a sample's pair
therefore depends neither on the batch size nor on the process or device that made it (up to
the last bit, see below), and the two images differ mainly where the prompts differ (the
object). The official MagicSeg code draws independent noise for the two images:
``pair_noise: independent`` does so too, reproducibly (the counterfactual's seed is the stream
``generate.cf_noise`` of the record's seed, :func:`counterfactual_seed`).

Counterfactuals (``counterfactual_mode``): ``prompt_swap`` paints the counterfactual prompt from
the shared noise; ``inpaint`` records the cross-attention of the class words while the positive
is painted (:class:`CrossAttentionRecorder`, DAAM-style), thresholds and dilates it into the
object region (:func:`attention_region`), repaints that region from the counterfactual prompt
with the same noise (:func:`repaint`) and pastes it back: outside ``Pair.cf_region`` the
counterfactual is the positive, byte for byte. Both cost two images of denoiser work per pair.

Speed: the positives and counterfactuals of several records go through one pipeline call, so
with classifier-free guidance each UNet step sees ``2 x images`` rows (``4 x pairs`` when a whole
batch goes in one call). ``images_per_call: auto`` is the whole batch, at most 32 images on a GPU
and at most 8 on a CPU, where ``benchmarks/generate.py`` measured 8 images per call 1.7x faster
than the naive loop (2.9x on loaded cores; a reduced SD 1.5-layout UNet at 128 px, 2 cores). On
CUDA: bf16 (fp16 where bf16 is missing), PyTorch SDPA attention (diffusers' default
``AttnProcessor2_0``), channels-last, optional ``torch.compile`` of the UNet, and a DPM-Solver++
multistep scheduler. Images that share a call can differ in the last bit (1/255 of a pixel) from
the same images made in another grouping (batched float kernels); ``batch_size: 1`` makes every
call one record's images, whatever else changes.

Models (``family``, detected from the pipeline class unless named): ``sd`` (SD 1.x/2.x,
SD-Turbo), ``sdxl`` (SDXL, SDXL-Turbo), ``sd3`` (SD 3/3.5, T5 encoder optional), ``flux``
(FLUX.1: packed latents, [schnell] without any guidance) and ``flux2`` (FLUX.2, FLUX.2 [klein]:
unpacked 128-channel latents), by hub id or local directory. Few-step models want
``scheduler: default``, ``steps: 1..4``, ``guidance: 0``; flow-matching families (SD3, FLUX)
keep their own scheduler. A checkpoint under a non-commercial licence is refused unless
``accept_noncommercial: true``; the inpainting counterfactual needs a UNet. The safety checker is off unless ``safety_checker: true``
(it blacks out flagged images, which would poison a segmentation dataset silently; the flag is
recorded in ``Pair.meta["nsfw"]`` when it is on).

Heavy imports (torch, diffusers) happen inside functions: importing this module is cheap.
"""

from magicseg.generate.diffusers.families import FAMILIES, Family, check_params, read_facts
from magicseg.generate.diffusers.generator import DiffusersPairGenerator
from magicseg.generate.diffusers.inpaint import (
    CrossAttentionRecorder,
    class_token_positions,
    dilate_mask,
    inpaint_counterfactual,
    load_inpaint_pipeline,
)
from magicseg.generate.diffusers.loading import load_pipeline, resolve_model_source
from magicseg.generate.diffusers.unet import initial_latents

__all__ = [
    "FAMILIES",
    "CrossAttentionRecorder",
    "DiffusersPairGenerator",
    "Family",
    "check_params",
    "class_token_positions",
    "dilate_mask",
    "initial_latents",
    "inpaint_counterfactual",
    "load_inpaint_pipeline",
    "load_pipeline",
    "read_facts",
    "resolve_model_source",
]

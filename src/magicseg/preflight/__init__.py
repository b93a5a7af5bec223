"""Pre-flight: the composed params checked as a whole before any expensive stage runs.

A paper-profile run spends money on the LLM, then GPU-hours on generation, labelling and
training; a typo in a model id or a missing benchmark root must fail in the first minute, not
after the training. :func:`run_checks` looks at everything the enabled backends will need and
returns one :class:`Check` per item, each ``ok``, ``warning`` or ``error`` and named by its
params key:

1. every model reference the enabled backends will load (:func:`magicseg.hub.
   check_model_source`: a local directory that exists, an id in the Hugging Face cache, or a
   hub that answers; offline mode refuses uncached ids), through the backends' own checks
   (a diffusers directory needs ``model_index.json``, and its family, licence and the
   generator's options must agree: :func:`magicseg.generate.diffusers.families.check_source`;
   the labelers' checkpoints their model type: Grounding DINO or MM-Grounding-DINO/LLMDet, SAM
   or SAM 2.1, SAM 3); SAM 3's licence opt-in (``label.sam3.accept_licence``, the SAM License)
   where SAM 3 will run;
   then each model's config (no weights) against the params that must fit it
   (:mod:`magicseg.preflight.models`: the decoder width and CLIP's joint dimension, the
   pipeline's components, the text lengths of the class prompts);
2. the LLM endpoint of ``prompts.writer: openai``: the key variable set, the server answering
   ``GET /models`` within a few seconds and accepting the key, the model listed;
3. every enabled benchmark's root and layout (the readers' own checks, nothing read);
4. that evaluate will have something to score (a warning otherwise: no error after training);
5. free disk for the planned dataset (``requests x per_request`` pairs at ``generate``'s size);
6. a GPU where a model stage runs: a CUDA device asked for and absent, or a dtype the device
   cannot run (float16 on a CPU), is an error; a data
   stage's model (Stable Diffusion, Grounded-SAM, a local LLM) on a CPU a warning; for
   ``train.architecture: clip`` a lower bound of the training time (the steps' FLOPs at this
   device's measured matmul rate), a warning on a CPU beyond :data:`CPU_TRAIN_WARNING_S`;
7. the ``launch`` section (:func:`check_launch`): processes against the visible GPUs (gloo on
   a CPU) and the global batch, the launcher, and that every node sees the output and cache
   directories (a shared filesystem; on one node, that they are writable).

Free disk and the devices are facts of this machine (``Check.machine``): printed, never written
to the report the ``check`` stage leaves for DVC, whose content is the verdict alone, so a
re-run that passes again changes nothing downstream and a no-op ``dvc repro`` stays a no-op.
Used by ``magicseg check`` and the ``check`` stage (``stages/check.py``).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from magicseg.core.config import Params
from magicseg.core.errors import MagicsegError
from magicseg.core.io import write_json
from magicseg.preflight.base import Check, Status

PNG_RATIO = 0.6
"""Bytes of a generated RGB image's PNG per raw byte (photographic content compresses
little; Stable Diffusion images at 512 px are about 0.4-0.5 MB)."""
JPEG_RATIO = 0.1
"""The same for ``generate.image_format: jpeg`` (quality 75): generous, an estimate by
argument (photographs at quality 75 take about 1-1.5 bits a pixel, 0.04-0.06 of raw), not
measured on Stable Diffusion images here."""
COPIES = 2
"""Copies of the images a run keeps: the per-sample cache (``.cache/magicseg``, hard-linked
into the stage outputs) and the DVC cache (a copy unless DVC links: ``cache.type``)."""
CPU_TRAIN_WARNING_S = 600.0
"""A clip training whose lower bound on a CPU exceeds this many seconds is a warning."""
CLEARED = ("prompts", "generate", "label", "filter", "train", "evaluate")
"""The stages a passed pre-flight clears (the report's content)."""


class PreflightError(MagicsegError):
    """At least one check failed: the first failure's line, and how many more there are."""


def _strip_key(message: str, key: str) -> str:
    return message[len(key) + 2 :] if message.startswith(f"{key}: ") else message


def _guard(key: str, fn: Callable[[], str], machine: bool = False) -> Check:
    """``ok`` with ``fn()``'s description, or ``error`` with the one-line MagicsegError,
    under the key it names when that is another key of the same block (a checkpoint refused
    for ``generate.diffusers.accept_noncommercial``)."""
    try:
        return Check("ok", key, fn(), machine)
    except MagicsegError as err:
        named = str(err).split(": ", 1)[0]
        if named != key and " " not in named and named.startswith(key.rsplit(".", 1)[0] + "."):
            key = named
        return Check("error", key, _strip_key(str(err), key), machine)


# --------------------------------------------------------------------------------------------
# 1. model references
# --------------------------------------------------------------------------------------------
WHERE = {"local": "local directory", "cached": "in the Hugging Face cache", "hub": "on the hub"}


def model_references(p: Params) -> list[tuple[str, str, Callable[[], str]]]:
    """(key, reference, check) of every model the enabled backends will load; each check
    returns where the model was found or raises the backend's own one-line error."""
    from magicseg.hub import check_model_source

    def hub(ref: str, key: str) -> Callable[[], str]:
        return lambda: WHERE[check_model_source(ref, key)]

    out: list[tuple[str, str, Callable[[], str]]] = []
    if p.prompts.writer == "transformers":
        key, ref = "prompts.transformers.checkpoint", p.prompts.transformers.checkpoint
        out.append((key, ref, hub(ref, key)))
    if p.generate.backend == "diffusers":
        from magicseg.generate.diffusers import resolve_model_source

        d = p.generate.diffusers
        key, ref = "generate.diffusers.checkpoint", d.checkpoint
        out.append((key, ref, lambda: _diffusers_family(p, resolve_model_source)))
        if d.counterfactual_mode == "inpaint" and d.inpaint_checkpoint:
            key, ref = "generate.diffusers.inpaint_checkpoint", d.inpaint_checkpoint
            out.append((key, ref, lambda r=ref, k=key: _diffusers(r, k, resolve_model_source)))
    if p.label.backend == "grounded_sam" or p.evaluate.segmenter == "grounded_sam":
        from magicseg.label.grounded_sam import DETECTOR_TYPES, SEGMENTER_TYPES, check_source

        g = p.label.grounded_sam
        for name, ref, types in (
            ("detector_checkpoint", g.detector_checkpoint, DETECTOR_TYPES),
            ("sam_checkpoint", g.sam_checkpoint, SEGMENTER_TYPES),
        ):
            key = f"label.grounded_sam.{name}"
            out.append((key, ref, lambda n=name, r=ref, t=types: _typed(n, r, t, check_source)))
    if uses_sam3(p):
        from magicseg.label.grounded_sam import check_source
        from magicseg.label.sam3 import MODEL_TYPES

        key, ref = "label.sam3.checkpoint", p.label.sam3.checkpoint
        out.append(
            (
                key,
                ref,
                lambda r=ref: _typed("checkpoint", r, MODEL_TYPES, check_source, "label.sam3"),
            )
        )
    if p.train.architecture == "clip":
        key, ref = "train.clip.checkpoint", p.train.clip.checkpoint
        out.append((key, ref, hub(ref, key)))
    return out


def _diffusers(ref: str, key: str, resolve: Callable[[str, str], str]) -> str:
    from magicseg.hub import check_model_source

    resolve(ref, key)  # the generator's own check: the source, then model_index.json
    return f"a diffusers pipeline, {WHERE[check_model_source(ref, key)]}"


def _typed(
    name: str, ref: str, types: tuple[str, ...], check: Callable, block: str = "label.grounded_sam"
) -> str:
    from magicseg.label.grounded_sam import model_type

    return f"a {model_type(check(name, ref, types, block))} checkpoint"


def uses_sam3(p: Params) -> bool:
    """SAM 3 will run: as the labeler or as the evaluated baseline."""
    return p.label.backend == "sam3" or p.evaluate.segmenter == "sam3"


def check_licences(p: Params) -> list[Check]:
    """The opt-in of every gated model that will run: SAM 3's SAM License."""
    if not uses_sam3(p):
        return []
    key = "label.sam3.accept_licence"
    if not p.label.sam3.accept_licence:
        from magicseg.label.sam3 import LICENCE

        return [Check("error", key, _strip_key(LICENCE, key))]
    return [Check("ok", key, "the SAM License is accepted (SAM 3)")]


def _diffusers_family(p: Params, resolve: Callable[[str, str], str]) -> str:
    """The generator's checkpoint: its source, then its family, licence and the options it
    cannot honour (:func:`magicseg.generate.diffusers.families.check_source`); each refusal
    is one line naming its own key (``generate.diffusers.family``, ``accept_noncommercial``,
    ``counterfactual_mode``, ``guidance``, ...)."""
    from magicseg.generate.diffusers.families import check_source
    from magicseg.hub import check_model_source

    d = p.generate.diffusers
    source = resolve(d.checkpoint, "generate.diffusers.checkpoint")
    what = check_source(d, source)
    return f"{what}, {WHERE[check_model_source(d.checkpoint, 'generate.diffusers.checkpoint')]}"


def check_models(p: Params) -> list[Check]:
    out = check_licences(p)
    out += [_guard(key, lambda r=ref, c=fn: f"{r} ({c()})") for key, ref, fn in model_references(p)]
    return out


# --------------------------------------------------------------------------------------------
# 2. the LLM endpoint
# --------------------------------------------------------------------------------------------
def check_llm(p: Params, timeout: float = 10.0) -> list[Check]:
    """``prompts.writer: openai``: key variable, server, model (nothing for other writers)."""
    if p.prompts.writer != "openai":
        return []
    from magicseg.prompts.openai_writer import open_client

    o = p.prompts.openai
    where = o.base_url or "the OpenAI API"
    if not os.environ.get(o.api_key_env):
        return [
            Check(
                "error",
                "prompts.openai.api_key_env",
                f"environment variable {o.api_key_env} is not set (the API key; servers "
                "without auth accept any value, e.g. EMPTY)",
            )
        ]
    out = [Check("ok", "prompts.openai.api_key_env", f"{o.api_key_env} is set")]
    try:
        _, models = open_client(o, timeout=min(timeout, o.timeout_s))
    except MagicsegError as err:
        return [
            *out,
            Check("error", "prompts.openai.base_url", _strip_key(str(err), "prompts.openai")),
        ]
    out.append(Check("ok", "prompts.openai.base_url", f"{where} answers and accepts the key"))
    if models is not None and o.llm not in models:
        shown = ", ".join(models[:5]) + (", ..." if len(models) > 5 else "")
        out.append(
            Check(
                "warning",
                "prompts.openai.llm",
                f"{o.llm!r} is not among the models {where} lists ({shown})",
            )
        )
    return out


# --------------------------------------------------------------------------------------------
# 3-4. benchmarks and what evaluate scores
# --------------------------------------------------------------------------------------------
def check_benchmarks(p: Params) -> list[Check]:
    from magicseg.evaluation.datasets import REAL_DATASETS, check_real_dataset, nothing_to_score

    out = []
    for name in REAL_DATASETS:
        block = getattr(p.evaluate, name)
        if block.enabled:
            key = f"evaluate.{name}.root"
            out.append(_guard(key, lambda n=name, r=block.root: f"{r}: {check_real_dataset(n, r)}"))
    enabled = [n for n in REAL_DATASETS if getattr(p.evaluate, n).enabled]
    if p.vocabulary.source != "procedural" and not enabled:
        out.append(Check("warning", "evaluate", nothing_to_score(p.vocabulary.source)))
    return out


def check_vocabulary(p: Params) -> list[Check]:
    v = p.vocabulary
    if v.source != "file":
        return []
    path = Path(v.file or "").expanduser()
    if not path.is_file():
        return [Check("error", "vocabulary.file", f"{v.file} does not exist")]
    return [Check("ok", "vocabulary.file", f"{v.file}")]


# --------------------------------------------------------------------------------------------
# 5. disk
# --------------------------------------------------------------------------------------------
def planned_bytes(p: Params) -> int:
    """Bytes of one copy of the planned dataset: ``requests x per_request`` pairs, each two
    RGB images (:data:`PNG_RATIO` of the raw size, :data:`JPEG_RATIO` for JPEG) and a
    class-index mask PNG (0.1 byte a pixel, generous: flat class maps compress well, 8 or 16
    bits alike)."""
    pairs = p.prompts.requests * p.prompts.per_request
    pixels = p.generate.height * p.generate.width
    ratio = JPEG_RATIO if p.generate.image_format == "jpeg" else PNG_RATIO
    return int(pairs * pixels * (2 * 3 * ratio + 0.1))


def check_disk(p: Params, where: str | Path = ".") -> Check:
    """Free space where the data goes: an error below one copy of the planned dataset, a
    warning below :data:`COPIES` copies."""
    one = planned_bytes(p)
    path = Path(where).resolve()
    free = shutil.disk_usage(path).free
    pairs = p.prompts.requests * p.prompts.per_request
    size = f"{pairs} pairs at {p.generate.height}x{p.generate.width}"
    need = f"about {_gb(one)} per copy, {_gb(COPIES * one)} with the DVC cache's"
    if free < one:
        status: Status = "error"
        tail = ": free space or lower prompts.requests"
    elif free < COPIES * one:
        status, tail = "warning", " (one copy where DVC links: dvc config cache.type)"
    else:
        status, tail = "ok", ""
    return Check(status, "disk", f"{_gb(free)} free at {path}; {size} need {need}{tail}", True)


def _gb(n: float) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


# --------------------------------------------------------------------------------------------
# 6. devices and the training time
# --------------------------------------------------------------------------------------------
def matmul_tflops(device, size: int = 1024, repeats: int = 3) -> float:
    """This device's measured dense matmul rate in TFLOP/s (fp32 on a CPU, bf16 on CUDA):
    the best of ``repeats`` timed products after one warm-up."""
    import time

    import torch

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if device.type == "cuda":
        size *= 4
    a = torch.randn(size, size, device=device, dtype=dtype)
    best = float("inf")
    for i in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        (a @ a).sum().item()
        if i:
            best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e12


@dataclass(frozen=True)
class VitShape:
    """What a ViT's cost depends on (defaults: CLIP ViT-B/16)."""

    hidden: int = 768
    intermediate: int = 3072
    layers: int = 12
    patch: int = 16


def vit_shape(ref: str) -> VitShape:
    """The vision tower's shape from the checkpoint's config (no weights); ViT-B/16 where the
    config cannot be read."""
    try:
        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(ref)
        v = getattr(cfg, "vision_config", cfg)
        return VitShape(v.hidden_size, v.intermediate_size, v.num_hidden_layers, v.patch_size)
    except Exception:  # noqa: BLE001 - any failure: the default shape, an estimate anyway
        return VitShape()


def clip_step_flops(p: Params, shape: VitShape) -> float:
    """FLOPs of one ``train.architecture: clip`` step, the vision tower only (the decoder is
    small beside it): per image ``layers x (2N(4D^2 + 2DI) + 4N^2 D)`` for N tokens (patches of
    the crop, CLS, visual prompts), x3 for the backward through the frozen tower to the deep
    prompts, x(1 + ``cf_fraction``) when counterfactuals also go through it (``cf_weight >
    0``). The crop is ``train.crop`` (the generated size without one)."""
    c = p.train.clip
    side = p.train.crop or max(p.generate.height, p.generate.width)
    n = (side // shape.patch) ** 2 + 1 + c.vpt_tokens
    d, i = shape.hidden, shape.intermediate
    per_image = shape.layers * (2 * n * (4 * d * d + 2 * d * i) + 4 * n * n * d)
    passes = 1 + p.train.cf_fraction if p.train.cf_weight > 0 else 1
    return float(p.train.batch_size * per_image * 3 * passes)


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 360 else f"{seconds / 60:.1f} min"


def check_devices(p: Params, measure: Callable | None = None) -> list[Check]:
    """The device of every model stage that will run: an error where CUDA is asked for and
    absent or the dtype cannot run on the device (float16 on a CPU), a warning for a data
    stage's model on a CPU; for clip, the training time's lower
    bound (a warning on a CPU beyond :data:`CPU_TRAIN_WARNING_S`).
    ``measure(device) -> TFLOP/s`` defaults to :func:`matmul_tflops` (tests pass a constant)."""
    from magicseg.core.devices import resolve_device, resolve_dtype

    measure = measure or matmul_tflops
    pairs = p.prompts.requests * p.prompts.per_request
    size = f"{p.generate.height}x{p.generate.width}"
    stages: list[tuple[str, str, str, str]] = []  # (block, device, dtype, work)
    if p.generate.backend == "diffusers":
        d = p.generate.diffusers
        work = f"{2 * pairs} images of {size} x {d.steps} steps through {d.checkpoint}"
        stages.append(("generate.diffusers", d.device, d.dtype, work))
    if p.label.backend == "grounded_sam":
        g = p.label.grounded_sam
        both = " and their counterfactuals" if g.cf_check else ""
        work = f"{pairs} positives{both} through Grounding DINO + SAM"
        stages.append(("label.grounded_sam", g.device, g.dtype, work))
    if p.label.backend == "sam3":
        s3 = p.label.sam3
        both = " and their counterfactuals" if s3.cf_check else ""
        work = f"{pairs} positives{both} through SAM 3, one prompt per class"
        stages.append(("label.sam3", s3.device, s3.dtype, work))
    if p.prompts.writer == "transformers":
        t = p.prompts.transformers
        work = f"{p.prompts.requests} requests through a local LLM"
        stages.append(("prompts.transformers", t.device, t.dtype, work))

    out: list[Check] = []
    for block, name, dtype, work in stages:
        key = f"{block}.device"
        try:
            device = resolve_device(name, key)
        except MagicsegError as err:
            out.append(Check("error", key, _strip_key(str(err), key), True))
            continue
        if device.type == "cpu":
            out.append(Check("warning", key, f"no GPU here: {work} on a CPU", True))
        else:
            out.append(Check("ok", key, f"{device} for {work}", True))
        try:  # the precision this device runs (float16 has no CPU kernels here)
            resolve_dtype(dtype, device, f"{block}.dtype")
        except MagicsegError as err:
            out.append(
                Check("error", f"{block}.dtype", _strip_key(str(err), f"{block}.dtype"), True)
            )

    if p.train.architecture == "clip":
        out.append(_train_time(p, measure))
    return out


def _train_time(p: Params, measure: Callable) -> Check:
    from magicseg.core.devices import resolve_device

    key = "train.device"
    try:
        device = resolve_device(p.train.device, key)
    except MagicsegError as err:
        return Check("error", key, _strip_key(str(err), key), True)
    flops = clip_step_flops(p, vit_shape(p.train.clip.checkpoint))
    rate = measure(device)
    seconds = p.train.steps * flops / (rate * 1e12)
    estimate = (
        f"{p.train.steps} clip steps of batch {p.train.batch_size} at crop {p.train.crop or p.generate.height}: "
        f"at least {_hours(seconds)} ({flops / 1e12:.2f} TFLOP a step at the {rate:.2f} TFLOP/s "
        f"this {device.type.upper()} multiplies at)"
    )
    if device.type == "cpu" and seconds >= CPU_TRAIN_WARNING_S:
        return Check("warning", key, f"no GPU here: {estimate}", True)
    return Check("ok", key, estimate, True)


# --------------------------------------------------------------------------------------------
# 7. the launch
# --------------------------------------------------------------------------------------------
SHARED_DIRS = ("data", ".cache/magicseg")
"""Where the launched stages' ranks meet (outputs and shards, the per-sample caches and the
training state), relative to the repository: every node must see them."""


def check_launch(
    p: Params,
    where: str | Path = ".",
    gpus: int | None = None,
    env: Mapping[str, str] | None = None,
    run: Callable[..., subprocess.CompletedProcess] = subprocess.run,
) -> list[Check]:
    """The ``launch`` section against this machine, one line each: the processes against the
    visible GPUs (gloo on a CPU) and the global batch; the launcher (only for more than one
    process); every node sees :data:`SHARED_DIRS` (several nodes: a token written here is read
    back by an ``srun`` task on each node; one node: the directories are writable).
    ``gpus``/``env``/``run``: the visible GPUs, environment and ``subprocess.run`` (tests)."""
    from magicseg.launch import Slurm, check_allocation, processes_per_node, visible_gpus

    launch, env = p.launch, os.environ if env is None else env
    gpus = visible_gpus() if gpus is None else gpus
    procs = processes_per_node(launch, gpus)
    world = procs * launch.nodes
    out = [_processes_line(p, procs, world, gpus)]
    slurm = Slurm.from_env(env)
    if world > 1:
        out.append(_launcher_line(p, slurm, check_allocation))
    if out[-1].key != "launch.nodes":  # else no allocation to look at the nodes with
        out.append(_shared_dirs_line(p, Path(where), slurm, run))
    return out


def _processes_line(p: Params, procs: int, world: int, gpus: int) -> Check:
    key = "launch.processes"
    nodes = f" on each of {p.launch.nodes} nodes" if p.launch.nodes > 1 else ""
    if p.train.batch_size % world:
        return Check(
            "error",
            "train.batch_size",
            f"{p.train.batch_size} images a step do not split over {world} processes"
            f"{f' ({procs}{nodes})' if nodes else ''}: make it a multiple of {world}",
            True,
        )
    if gpus == 0:
        if procs == 1:
            return Check("ok", key, f"1 process{nodes} (no GPU here)", True)
        return Check("ok", key, f"{procs} processes{nodes} on the CPU: gloo, no GPU here", True)
    if procs > gpus:
        return Check(
            "error",
            key,
            f"{procs} processes{nodes}, {gpus} GPUs visible: one GPU a process (at most {gpus}, "
            "or auto)",
            True,
        )
    share = f"{procs} of the {gpus} visible GPUs (auto: all)" if procs < gpus else "every GPU"
    status: Status = "warning" if procs < gpus else "ok"
    return Check(status, key, f"{procs} processes{nodes}, one a GPU: {share}", True)


def _launcher_line(p: Params, slurm, check_allocation: Callable) -> Check:
    key, launcher = "launch.launcher", p.launch.launcher
    try:
        check_allocation(p.launch, slurm)
    except MagicsegError as err:
        return Check("error", "launch.nodes", _strip_key(str(err), "launch.nodes"), True)
    if launcher == "accelerate" and importlib.util.find_spec("accelerate") is None:
        return Check("error", key, "accelerate is not installed", True)
    if launcher == "srun" or p.launch.nodes > 1:
        if slurm.job_id is None:
            return Check(
                "error", key, f"{launcher} needs a SLURM allocation (sbatch, salloc)", True
            )
        if shutil.which("srun") is None:
            return Check("error", key, "srun is not on PATH", True)
    where = f" in SLURM job {slurm.job_id}" if slurm.job_id else ""
    return Check("ok", key, f"{launcher}{where}", True)


def _shared_dirs_line(p: Params, root: Path, slurm, run: Callable) -> Check:
    key, nodes = "launch.nodes", p.launch.nodes
    dirs = [root / d for d in SHARED_DIRS]
    names = " and ".join(SHARED_DIRS)
    token = os.urandom(8).hex()
    marks = []
    try:
        for d in dirs:
            d.mkdir(parents=True, exist_ok=True)
            mark = d / f".magicseg-shared-{token}"
            mark.write_text(token + "\n")
            marks.append(mark)
        if nodes == 1:
            return Check(
                "ok",
                key,
                f"1 node: {names} writable (several nodes need them on a filesystem every "
                "node shares)",
                True,
            )
        if shutil.which("srun") is None:
            return Check("error", key, f"{nodes} nodes: srun is not on PATH", True)
        cmd = ["srun", "--nodes", str(nodes), "--ntasks-per-node", "1", "--label"]
        cmd += ["cat", *map(str, marks)]
        seen = run(cmd, capture_output=True, text=True, timeout=300)
        found = [line for line in seen.stdout.splitlines() if line.endswith(token)]
        if seen.returncode != 0 or len(found) < nodes * len(marks):
            return Check(
                "error",
                key,
                f"not every node of job {slurm.job_id} sees {names} under {root.resolve()}: put "
                f"the repository on a filesystem all {nodes} nodes share",
                True,
            )
        return Check("ok", key, f"all {nodes} nodes see {names} under {root.resolve()}", True)
    except OSError as err:
        return Check("error", key, f"cannot write in {err.filename}: {err.strerror}", True)
    finally:
        for mark in marks:
            mark.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------
# all of it
# --------------------------------------------------------------------------------------------
def run_checks(
    p: Params,
    where: str | Path = ".",
    timeout: float = 10.0,
    measure: Callable | None = None,
) -> Iterator[Check]:
    """Every check of the module docstring, in its order, as they complete. ``where``: the
    directory the data goes to (free disk); ``timeout``: seconds for the LLM endpoint."""
    from magicseg.preflight.models import check_model_params

    yield from check_vocabulary(p)
    models = check_models(p)
    yield from models
    yield from check_model_params(p, {c.key for c in models if c.status == "error"})
    yield from check_llm(p, timeout)
    yield from check_benchmarks(p)
    yield check_disk(p, where)
    yield from check_devices(p, measure)
    yield from check_launch(p, where)


def preflight(
    p: Params,
    report_path: str | Path | None = None,
    where: str | Path = ".",
    echo: Callable[[str], object] = print,
    **kwargs,
) -> list[Check]:
    """Run the checks, ``echo`` one line each; raise :class:`PreflightError` (the first
    error's line, and how many more failed) if any failed, else write the report (the verdict
    and the stages it clears: nothing of this machine, nothing that changes with a param) to
    ``report_path``."""
    checks = []
    for check in run_checks(p, where, **kwargs):
        echo(check.line())
        checks.append(check)
    errors = [c for c in checks if c.status == "error"]
    if errors:
        more = f" (and {len(errors) - 1} more failed checks above)" if len(errors) > 1 else ""
        raise PreflightError(f"{errors[0].key}: {errors[0].message}{more}")
    if report_path is not None:
        write_json(report_path, report())
    return checks


def report() -> dict:
    """What the ``check`` stage leaves for DVC: the same bytes after every passed pre-flight."""
    return {
        "passed": True,
        "cleared": list(CLEARED),
        "checks": "printed by the stage and by `magicseg check`; this file holds the verdict "
        "alone, so a pre-flight that passes again re-runs nothing downstream",
    }


__all__ = ["Check", "PreflightError", "check_launch", "preflight", "report", "run_checks"]

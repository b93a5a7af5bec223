"""Pairs/second of the diffusers pair generator against the naive loop, same run, same model.

Naive baseline (the official MagicSeg loop): two separate pipeline calls per prompt (positive,
then counterfactual), batch 1. ``ours``: ``DiffusersPairGenerator`` with its defaults for the
device (``images_per_call: auto``, ``dtype: auto``), both on the same pipeline object (same
random weights, scheduler, steps, guidance, size). Then each speed lever alone.

    # GPU: full-size SD 1.5 architecture, random weights, 512 px, bf16 (H100/H200 peak known)
    python benchmarks/generate.py --device cuda
    python benchmarks/generate.py --device cuda --compile        # adds the torch.compile lever
    # CPU (~4 min on 2 quiet cores): a reduced SD 1.5-layout UNet (35M params) at 128 px
    python benchmarks/generate.py --device cpu

FLOPs per pair are counted with ``torch.utils.flop_counter.FlopCounterMode`` over one pair
(UNet + text encoder + VAE decoder), giving the share of the device peak (``--peak-tflops``;
defaults: H100/H200 dense bf16 989 TFLOP/s; on a CPU an assumed 2 AVX-512 FMA units per core
at the current clock, fp32). Every configuration gets one untimed warm-up run (oneDNN/cuDNN
kernel selection per shape costs seconds on a CPU; compile), then timings alternate between
configurations over ``--repeats`` rounds and report the fastest round of each (the least
disturbed by other processes on a shared machine).
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402

from magicseg.core.config import DiffusersGeneratorParams, GenerateParams  # noqa: E402
from magicseg.core.devices import resolve_dtype  # noqa: E402
from magicseg.generate.base import PromptRecord  # noqa: E402
from magicseg.generate.diffusers import DiffusersPairGenerator  # noqa: E402

GPU_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0}
"""Dense bf16/fp16 tensor-core peak (TFLOP/s) by device-name substring (SXM figures)."""

ARCHS = {
    # SD 1.5: UNet 860M, VAE 84M, CLIP ViT-L/14 text encoder 123M
    "sd15": dict(unet=(320, 640, 1280, 1280), cross=768, heads=8, vae=(128, 256, 512, 512),
                 text_layers=12, text_heads=12, text_ffn=3072),
    # the same layout at 1/5 width: UNet 35M
    "small": dict(unet=(64, 128, 256, 256), cross=256, heads=8, vae=(32, 64, 128, 128),
                  text_layers=4, text_heads=4, text_ffn=1024),
    # a toy: UNet ~1M
    "tiny": dict(unet=(32, 64), cross=32, heads=8, vae=(32, 64), text_layers=2, text_heads=4,
                 text_ffn=37),
}  # fmt: skip


def build_pipeline(arch: str, size: int, dtype: torch.dtype, device: torch.device):
    """A random-init SD pipeline with the named architecture (built from configs, no hub)."""
    from diffusers import (
        AutoencoderKL,
        PNDMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from tests.tiny_models import write_clip_tokenizer
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    a = ARCHS[arch]
    torch.manual_seed(0)
    n = len(a["unet"])
    vae_factor = 2 ** (len(a["vae"]) - 1)
    unet = UNet2DConditionModel(
        sample_size=size // vae_factor,
        block_out_channels=a["unet"],
        layers_per_block=2 if arch != "tiny" else 1,
        down_block_types=("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1),
        cross_attention_dim=a["cross"],
        attention_head_dim=a["heads"],
        norm_num_groups=32,
    )
    vae = AutoencoderKL(
        block_out_channels=a["vae"],
        down_block_types=("DownEncoderBlock2D",) * len(a["vae"]),
        up_block_types=("UpDecoderBlock2D",) * len(a["vae"]),
        layers_per_block=2 if arch != "tiny" else 1,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=size,
    )
    with tempfile.TemporaryDirectory() as tmp:
        tok = CLIPTokenizer.from_pretrained(write_clip_tokenizer(Path(tmp)))
    text = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408 if arch == "sd15" else len(tok),
            hidden_size=a["cross"],
            intermediate_size=a["text_ffn"],
            num_hidden_layers=a["text_layers"],
            num_attention_heads=a["text_heads"],
            max_position_embeddings=77,
            hidden_act="quick_gelu",
        )
    ).eval()
    sched = PNDMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True
    )
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text, tokenizer=tok, unet=unet, scheduler=sched,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    return pipe.to(device=device, dtype=dtype)


def records(n: int) -> list[PromptRecord]:
    things = ["red kite", "school bus", "golden retriever", "teapot", "bicycle", "owl"]
    return [
        PromptRecord(
            id=f"b{i}",
            prompt=f"a photo of a {things[i % len(things)]} in a busy street at dusk",
            cf_prompt="a photo of a busy street at dusk",
            class_ids=(1,),
            class_names=(things[i % len(things)],),
            seed=10_000 + i,
        )
        for i in range(n)
    ]


def naive_pairs(pipe, recs, args) -> None:
    """The official loop: per prompt, two pipeline calls of batch 1."""
    for rec in recs:
        for prompt in (rec.prompt, rec.cf_prompt):
            pipe(
                prompt,
                generator=torch.Generator("cpu").manual_seed(rec.seed),
                num_inference_steps=args.steps,
                guidance_scale=args.guidance,
                height=args.size,
                width=args.size,
                output_type="np",
            )


def ours_runner(gen: DiffusersPairGenerator, batch_size: int):
    def run(recs):
        for i in range(0, len(recs), batch_size):
            gen.generate(recs[i : i + batch_size])

    return run


def timed(fn, recs, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    fn(recs)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t


def flops_per_pair(gen: DiffusersPairGenerator, rec: PromptRecord) -> float:
    from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

    def cpu_sdpa(q_shape, k_shape, v_shape, *args, out_shape=None, **kwargs) -> int:
        return sdpa_flop_count(q_shape, k_shape, v_shape)

    # the CPU SDPA kernel has no formula upstream: count it like the CUDA flash kernel
    mapping = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: cpu_sdpa}
    counter = FlopCounterMode(display=False, custom_mapping=mapping)
    with counter:
        gen.generate([rec])
    return float(counter.get_total_flops())


def default_peak(device: torch.device) -> tuple[float | None, str]:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peak in GPU_PEAK_TFLOPS.items():
            if key in name:
                return peak, f"{name}: dense bf16 {peak:g} TFLOP/s (datasheet)"
        return None, f"{name}: unknown peak (pass --peak-tflops)"
    mhz = 0.0
    try:
        mhz = max(
            float(line.split(":")[1])
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("cpu MHz")
        )
    except (OSError, ValueError):
        pass
    if not mhz:
        return None, "CPU: unknown clock (pass --peak-tflops)"
    threads = torch.get_num_threads()
    peak = threads * mhz * 1e6 * 64 / 1e12  # 2 FMA units x 16 fp32 lanes x 2 flops
    return peak, f"CPU: assumed {threads} cores x {mhz:.0f} MHz x 64 fp32 flop/cycle"


def main() -> None:
    # 1. Arguments, with per-device defaults.
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--arch", choices=sorted(ARCHS))
    ap.add_argument("--size", type=int)
    ap.add_argument("--steps", type=int)
    ap.add_argument("--pairs", type=int, help="pairs per timed run")
    ap.add_argument("--batch-size", type=int, help="generate.batch_size (pairs per call)")
    ap.add_argument("--scheduler", default="dpm++")
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--repeats", type=int, help="timing rounds (fastest reported)")
    ap.add_argument("--peak-tflops", type=float, help="device peak for the utilisation share")
    ap.add_argument("--compile", action="store_true", help="also time the torch.compile lever")
    ap.add_argument("--no-levers", action="store_true", help="only naive vs default")
    args = ap.parse_args()
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    if gpu and not torch.cuda.is_available():
        sys.exit("--device cuda: CUDA is not available here")
    args.arch = args.arch or ("sd15" if gpu else "small")
    args.size = args.size or (512 if gpu else 128)
    args.steps = args.steps or (20 if gpu else 6)
    args.pairs = args.pairs or (16 if gpu else 4)
    args.batch_size = args.batch_size or (8 if gpu else 4)
    args.repeats = args.repeats or 3

    def params(**kw) -> GenerateParams:
        opts = dict(checkpoint="<in-memory>", scheduler=args.scheduler, steps=args.steps,
                    guidance=args.guidance, device=args.device) | kw  # fmt: skip
        return GenerateParams(
            backend="diffusers",
            height=args.size,
            width=args.size,
            batch_size=args.batch_size,
            diffusers=DiffusersGeneratorParams(**opts),
        )

    # 2. One random-init pipeline per dtype; "ours" default and the naive loop share it.
    dtype = resolve_dtype("auto", device, "--dtype")
    t0 = time.perf_counter()
    pipe = build_pipeline(args.arch, args.size, dtype, device)
    n_unet = sum(p.numel() for p in pipe.unet.parameters()) / 1e6
    print(
        f"device {args.device} ({torch.get_num_threads()} threads), arch {args.arch} "
        f"(UNet {n_unet:.0f}M params), {args.size}px, {args.steps} steps {args.scheduler}, "
        f"guidance {args.guidance}, {args.pairs} pairs, batch {args.batch_size}, default dtype "
        f"{str(dtype).removeprefix('torch.')} (built in {time.perf_counter() - t0:.1f}s)"
    )
    default = DiffusersPairGenerator(params(), pipeline=pipe)
    configs: dict[str, object] = {
        "naive (2 calls/pair, batch 1)": lambda r: naive_pairs(pipe, r, args),
        f"ours default (images_per_call={default.images_per_call})": ours_runner(
            default, args.batch_size
        ),
    }

    # 3. The levers, each alone on top of the default.
    if not args.no_levers:
        for k in sorted(
            {k for k in (1, 2, 4, 8) if k < 2 * args.batch_size} | {2 * args.batch_size}
        ):
            if k != default.images_per_call:
                gen = DiffusersPairGenerator(params(images_per_call=k), pipeline=pipe)
                configs[f"ours images_per_call={k}"] = ours_runner(gen, args.batch_size)
        other = torch.float32 if gpu else torch.bfloat16
        if gpu or torch.backends.mkldnn.is_available():
            name = str(other).removeprefix("torch.")
            pipe2 = build_pipeline(args.arch, args.size, other, device)
            gen = DiffusersPairGenerator(params(dtype=name), pipeline=pipe2)
            configs[f"ours dtype={name}"] = ours_runner(gen, args.batch_size)
    if args.compile:
        pipe3 = build_pipeline(args.arch, args.size, dtype, device)
        gen = DiffusersPairGenerator(params(compile=True), pipeline=pipe3)
        configs["ours compile=True"] = ours_runner(gen, args.batch_size)

    # 4. FLOPs per pair (one pair, counted); warm-up (compile, kernels); alternating timed runs.
    recs = records(args.pairs)
    flops = flops_per_pair(
        DiffusersPairGenerator(params(images_per_call=2), pipeline=pipe), recs[0]
    )
    print(f"  model FLOPs per pair: {flops / 1e12:.3f} TFLOP", flush=True)
    for name, fn in configs.items():
        t = timed(fn, recs[: args.batch_size], device)
        print(f"  warm-up {name}: {t:.1f}s", flush=True)
    times: dict[str, list[float]] = {name: [] for name in configs}
    for r in range(args.repeats):
        for name, fn in configs.items():
            times[name].append(timed(fn, recs, device))
        print(f"  round {r + 1}/{args.repeats}: " + ", ".join(
            f"{ts[-1]:.1f}s" for ts in times.values()), flush=True)  # fmt: skip

    # 5. The report.
    peak, peak_note = (args.peak_tflops, "given") if args.peak_tflops else default_peak(device)
    base = min(times[next(iter(configs))])
    print(f"model FLOPs per pair: {flops / 1e12:.3f} TFLOP; peak {peak_note}")
    print(f"{'config':44s} {'pairs/s':>9s} {'vs naive':>9s} {'TFLOP/s':>8s} {'of peak':>8s}")
    for name, ts in times.items():
        med = min(ts)
        rate = args.pairs / med
        achieved = flops * rate / 1e12
        share = f"{100 * achieved / peak:7.1f}%" if peak else "      -"
        print(f"{name:44s} {rate:9.3f} {base / med:8.2f}x {achieved:8.3f} {share}")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    mem = f"peak RSS {rss:.0f} MiB"
    if gpu:
        mem += f", CUDA max allocated {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB"
    print(mem)


if __name__ == "__main__":
    main()

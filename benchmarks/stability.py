"""How much a trained offline model's test mIoU moves with things that should not matter: the
training seed, the thread count (1 vs 2) and the precision (fp32 vs bf16 autocast), in one run,
on a small training config; plus the EMA lever (``train.ema``) over the same seeds.

One procedural dataset (exact masks, held-out classes drawn at seed 0) and one procedural test
set (``evaluate.test_seed: 0``) serve every run, so what varies is the training alone: the
seed's initial weights, batch order, flips and sampled classes, or the kernels. The real
pipeline's seed also re-draws the data, prompts and (by default) the held-out classes and the
test set, so its spread is larger than the training spread measured here.

Every run is the real loop (:func:`magicseg.training.loop.train`) and the real evaluation
(:func:`magicseg.evaluation.stage.run_evaluate`) with the MiniLM text encoder, in this process
one after another. Printed: per run the test mIoU (seen, held-out, held-out novel words); the
sample standard deviation over seeds (fp32, and fp32 + EMA); the absolute differences 1 vs 2
threads (fp32 and bf16) and fp32 vs bf16 (seed 0, 1 thread). Written: ``--out`` (default
``metrics/stability.json``), the figures the README's everyday-commands section quotes
(``--readme`` rewrites that block from the file).

    python benchmarks/stability.py [--seeds 0,1,2] [--steps 160] [--samples 600] [--classes 20]
    python benchmarks/stability.py --readme      # README block from metrics/stability.json
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METRICS = ("miou_seen", "miou_heldout", "miou_heldout_novel")
LABELS = {"miou_seen": "seen", "miou_heldout": "held-out", "miou_heldout_novel": "novel words"}
README_START, README_END = "<!-- stability:start -->", "<!-- stability:end -->"


def make_dataset(root: Path, n: int, size: int, limit: int) -> tuple[Path, Path]:
    """``n`` procedural pairs with exact masks over the first ``limit`` catalogue classes (4
    held-out combinations and 1 novel word drawn at seed 0), one class an image, in the
    layout of the filter stage's output (``filter/``, ``vocabulary/``): the training-levers
    benchmark's data on a smaller world."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from train_levers import make_dataset as levers_dataset

    return levers_dataset(root, n, size, limit=limit, combination=4, novel=1)


def runs_of(seeds: list[int], ema: float, bf16_threads: bool = False) -> dict[str, dict]:
    """Run name -> train overrides (seed, num_threads, precision, ema). ``bf16_threads``: also
    bf16 at 2 threads (bf16 is emulated, and so several times slower, on a CPU without AVX-512
    BF16 / AMX)."""
    out = {}
    for s in seeds:
        out[f"fp32/t1/s{s}"] = {"seed": s, "num_threads": 1, "precision": "fp32"}
    first = seeds[0]
    out[f"fp32/t2/s{first}"] = {"seed": first, "num_threads": 2, "precision": "fp32"}
    out[f"bf16/t1/s{first}"] = {"seed": first, "num_threads": 1, "precision": "bf16"}
    if bf16_threads:
        out[f"bf16/t2/s{first}"] = {"seed": first, "num_threads": 2, "precision": "bf16"}
    for s in seeds:
        out[f"fp32+ema/t1/s{s}"] = {"seed": s, "num_threads": 1, "precision": "fp32", "ema": ema}
    return out


def spread(values: list[float | None]) -> dict:
    """values, mean and sample std (None where fewer than 2 values are finite numbers)."""
    xs = [v for v in values if v is not None and math.isfinite(v)]
    mean = statistics.fmean(xs) if xs else None
    std = statistics.stdev(xs) if len(xs) > 1 else None
    return {"values": values, "mean": _r(mean), "std": _r(std)}


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 4)


def _diff(a: dict, b: dict, metric: str) -> float | None:
    if a.get(metric) is None or b.get(metric) is None:
        return None
    return _r(abs(a[metric] - b[metric]))


def summarize(results: dict[str, dict], seeds: list[int]) -> dict:
    """The spreads and differences of ``results`` (run name -> test metrics)."""
    s0 = seeds[0]
    out = {"seeds": {}, "seeds_ema": {}, "threads_fp32": {}, "threads_bf16": {}, "precision": {}}
    for m in METRICS:
        out["seeds"][m] = spread([results[f"fp32/t1/s{s}"].get(m) for s in seeds])
        out["seeds_ema"][m] = spread([results[f"fp32+ema/t1/s{s}"].get(m) for s in seeds])
        out["threads_fp32"][m] = _diff(results[f"fp32/t1/s{s0}"], results[f"fp32/t2/s{s0}"], m)
        if f"bf16/t2/s{s0}" in results:
            t1, t2 = results[f"bf16/t1/s{s0}"], results[f"bf16/t2/s{s0}"]
            out["threads_bf16"][m] = _diff(t1, t2, m)
        out["precision"][m] = _diff(results[f"fp32/t1/s{s0}"], results[f"bf16/t1/s{s0}"], m)
    return out


def readme_block(data: dict) -> str:
    """The README's noise table (between the stability markers) from ``metrics/stability.json``."""
    c, s = data["config"], data["summary"]

    def cell(x):
        return "–" if x is None else f"{x:.3f}"

    rows = [
        ("std over seeds (fp32, 1 thread)", {m: s["seeds"][m]["std"] for m in METRICS}),
        ("std over seeds (fp32 + EMA)", {m: s["seeds_ema"][m]["std"] for m in METRICS}),
        ("\\|1 − 2 threads\\| (fp32)", s["threads_fp32"]),
        *([("\\|1 − 2 threads\\| (bf16)", s["threads_bf16"])] if s["threads_bf16"] else []),
        ("\\|fp32 − bf16\\| (1 thread)", s["precision"]),
    ]
    lines = [
        f"`python benchmarks/stability.py` ({c['steps']} steps of batch {c['batch_size']} at "
        f"{c['size']} px on {c['samples']} procedural pairs of {c['classes']} classes, K "
        f"{c['num_sampled']} (at most the trainable classes), "
        f"{c['test_samples']} test images; seeds {','.join(map(str, c['seeds']))}; EMA decay "
        f"{c['ema']}) wrote `metrics/stability.json`:",
        "",
        "| test mIoU moves by | " + " | ".join(LABELS[m] for m in METRICS) + " |",
        "|---|" + "---|" * len(METRICS),
    ]
    for name, values in rows:
        lines.append(f"| {name} | " + " | ".join(cell(values[m]) for m in METRICS) + " |")
    means = ", ".join(f"{LABELS[m]} {cell(s['seeds'][m]['mean'])}" for m in METRICS)
    lines += ["", f"The level these moves are measured at (mean over the fp32 seeds): {means}."]
    return "\n".join(lines)


def write_readme(data: dict, readme: Path = ROOT / "README.md") -> None:
    text = readme.read_text()
    head, rest = text.split(README_START)
    _, tail = rest.split(README_END)
    readme.write_text(f"{head}{README_START}\n{readme_block(data)}\n{README_END}{tail}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--steps", type=int, default=160)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--samples", type=int, default=600, help="procedural training pairs")
    ap.add_argument("--size", type=int, default=32, help="image side in pixels")
    ap.add_argument("--classes", type=int, default=20, help="first N catalogue classes")
    ap.add_argument("--num-sampled", type=int, default=20)
    ap.add_argument("--test-samples", type=int, default=200)
    ap.add_argument("--ema", type=float, default=0.98)
    ap.add_argument("--bf16-threads", action="store_true", help="also bf16 at 2 threads")
    ap.add_argument("--only", default=None, help="comma-separated run names (a quick check)")
    ap.add_argument("--out", type=Path, default=ROOT / "metrics/stability.json")
    ap.add_argument("--readme", action="store_true", help="rewrite the README block from --out")
    args = ap.parse_args()
    if args.readme:
        write_readme(json.loads(args.out.read_text()))
        print(f"README.md stability block refreshed from {args.out}")
        return

    import torch

    from magicseg.core.config import EvaluateParams, TrainParams
    from magicseg.evaluation.stage import run_evaluate
    from magicseg.model import build_text_encoder
    from magicseg.training.loop import model_config, train

    seeds = [int(s) for s in args.seeds.split(",")]
    runs = runs_of(seeds, args.ema, args.bf16_threads)
    if args.only:
        runs = {k: v for k, v in runs.items() if k in args.only.split(",")}
    base = TrainParams.model_validate(
        {
            "steps": args.steps,
            "batch_size": args.batch_size,
            "num_sampled": args.num_sampled,
            "val_every": args.steps,
            "val_samples": 64,
            "logger": "none",
        }
    )
    encoder = build_text_encoder("minilm", model_config(base))
    evaluate = EvaluateParams(test_samples=args.test_samples, test_seed=0, gallery_samples=0)
    results, t_start = {}, time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="magicseg-stability-") as tmp:
        root = Path(tmp)
        filter_dir, vocab_dir = make_dataset(root / "data", args.samples, args.size, args.classes)
        for name, over in runs.items():
            t0 = time.perf_counter()
            seed = over.pop("seed")
            params = base.model_copy(update=over)
            out = root / name.replace("/", "_")
            train(filter_dir, vocab_dir, params, seed, out, None, None, encoder)
            metrics = run_evaluate(
                out / "model.pt", vocab_dir, evaluate, seed, text_encoder=encoder
            )
            proc = metrics["procedural"]
            results[name] = {m: _r(proc.get(m)) for m in METRICS}
            print(
                f"{name:<20} "
                + "  ".join(f"{LABELS[m]} {results[name][m]}" for m in METRICS)
                + f"  ({time.perf_counter() - t0:.0f} s)",
                flush=True,
            )
    torch.set_num_threads(1)
    minutes = (time.perf_counter() - t_start) / 60
    if args.only:
        print(f"stability: {len(results)} runs in {minutes:.1f} min (--only: nothing written)")
        return
    summary = summarize(results, seeds)
    data = {
        "command": "python benchmarks/stability.py " + " ".join(sys.argv[1:]),
        "config": {
            "seeds": seeds,
            "steps": args.steps,
            "batch_size": args.batch_size,
            "samples": args.samples,
            "size": args.size,
            "classes": args.classes,
            "num_sampled": args.num_sampled,
            "test_samples": args.test_samples,
            "ema": args.ema,
            "torch": torch.__version__,
        },
        "runs": results,
        "summary": summary,
    }
    args.out.write_text(json.dumps(data, indent=2) + "\n")
    for key, title in (("seeds", "std over seeds (fp32)"), ("seeds_ema", "std over seeds (EMA)")):
        print(f"{title:<28}" + "  ".join(f"{LABELS[m]} {summary[key][m]['std']}" for m in METRICS))
    for key in [k for k in ("threads_fp32", "threads_bf16", "precision") if summary[k]]:
        print(f"|diff| {key:<21}" + "  ".join(f"{LABELS[m]} {summary[key][m]}" for m in METRICS))
    print(f"stability: {len(results)} runs in {minutes:.1f} min; wrote {args.out}")


if __name__ == "__main__":
    main()

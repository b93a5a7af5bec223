"""Per-sample cache: what a cold run costs, and what resuming and growing save.

Runs the procedural ``generate`` stage library on N prompts (CPU), three ways, in one process:
cold cache (every pair made, cached, hard-linked), warm cache (a re-run after a kill: every
pair linked from the cache), and a grown dataset (+25% prompts: only the new pairs made); the baseline writes each pair
straight into the output directory, as the stage did before the cache.
Prints seconds, ratios, and the peak RSS.

    python benchmarks/bench_sample_cache.py --requests 150
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

from magicseg.core.config import Params
from magicseg.core.io import write_manifest
from magicseg.core.vocabulary import build_vocabulary
from magicseg.generate import run_generate
from magicseg.prompts.stage import run_prompts


def prompts(root: Path, requests: int) -> Path:
    p = Params()
    vocab = build_vocabulary("procedural", holdout_combination=8)
    write_manifest(root / "vocabulary", vocab.to_frame())
    run_prompts(vocab, p.prompts.model_copy(update={"requests": requests}), 0, root / "prompts")
    return root / "prompts"


def direct(prompts_dir: Path, out: Path) -> None:
    """The pre-cache way: render and write each pair straight into the output directory."""
    from magicseg.core.io import read_manifest, write_image, write_mask
    from magicseg.generate import build_generator, records_from_manifest

    g = build_generator(Params().generate)
    for rec in records_from_manifest(read_manifest(prompts_dir)):
        pair = g.render(rec)
        write_image(out / f"images/{rec.id}.png", pair.positive)
        write_image(out / f"counterfactual/{rec.id}.png", pair.counterfactual)
        write_mask(out / f"oracle/{rec.id}.png", pair.oracle_mask, 48)


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=150, help="x10 prompts each")
    args = ap.parse_args()
    gen = Params().generate
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        small = prompts(root / "small", args.requests)
        big = prompts(root / "big", args.requests + args.requests // 4)
        cache = root / "cache"
        base = timed(lambda: direct(small, root / "o0"))
        cold = timed(lambda: run_generate(small, root / "o1", gen, 48, cache_dir=cache))
        warm = timed(lambda: run_generate(small, root / "o2", gen, 48, cache_dir=cache))
        grow = timed(lambda: run_generate(big, root / "o3", gen, 48, cache_dir=cache))
        fresh = timed(lambda: run_generate(big, root / "o4", gen, 48, cache_dir=root / "c2"))
    pairs = args.requests * 10
    print(f"pairs: {pairs} (grown: {pairs + pairs // 4}), 64x64 procedural, CPU")
    print(f"direct writes       {base:7.2f} s  (baseline: no cache, no manifest)")
    print(f"cold cache          {cold:7.2f} s  ratio {cold / base:.3f}")
    print(f"warm cache (resume) {warm:7.2f} s  ratio {warm / cold:.3f}")
    print(
        f"grown +25%, cached  {grow:7.2f} s  vs from scratch {fresh:7.2f} s, ratio {grow / fresh:.3f}"
    )
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()

"""Peak memory of the Hugging Face export for N and 4N samples: streamed vs built in memory.

Writes a filter/label/generate/vocabulary layout of N samples whose rows point at a few
procedural pairs of ``--size`` px (so 60k rows take seconds to make; the export still reads
every row's bytes), then runs each export in a fresh process and prints its peak RSS
(``ru_maxrss``) and seconds:

- ``streamed``: :func:`magicseg.export.hf.export_hf` (Parquet shards, DatasetDict on disk, card);
- ``in_memory`` (the baseline): every row with its image bytes in a list, then
  ``datasets.Dataset.from_list(rows).to_parquet(...)``, the obvious way to build the set.

The ratio 4N / N of peak RSS is ~1 for a memory-bounded export and grows towards 4 for one
that holds the data.

    python benchmarks/export_memory.py --samples 2000 --size 128
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd


def make_layout(root: Path, n: int, size: int, distinct: int = 8) -> None:
    """``n`` kept samples in the stages' layout; sample i uses pair ``i % distinct``."""
    from magicseg.core.config import ProceduralGeneratorParams
    from magicseg.core.io import write_image, write_manifest, write_mask
    from magicseg.core.vocabulary import build_vocabulary
    from magicseg.generate.base import PromptRecord
    from magicseg.generate.procedural import ProceduralGenerator

    vocab = build_vocabulary("procedural", holdout_combination=8)
    write_manifest(root / "vocabulary", vocab.to_frame())
    gen = ProceduralGenerator(ProceduralGeneratorParams(), size, size)
    for k in range(distinct):
        c = vocab.trainable[k]
        rec = PromptRecord(f"p{k}", f"a {vocab.names[c - 1]}", "", (c,), (vocab.names[c - 1],), k)
        pair = gen.render(rec)
        write_image(root / f"generate/images/{k}.png", pair.positive)
        write_image(root / f"generate/counterfactual/{k}.png", pair.counterfactual)
        write_mask(root / f"label/masks/{k}.png", pair.oracle_mask, len(vocab))
    ids = [f"s{i:06d}" for i in range(n)]
    k = [i % distinct for i in range(n)]
    cls = [[vocab.trainable[j]] for j in k]
    write_manifest(
        root / "generate",
        pd.DataFrame({"id": ids, "cf_prompt": ["nothing"] * n, "seed": list(range(n))}),
    )
    write_manifest(
        root / "filter",
        pd.DataFrame(
            {
                "id": ids,
                "prompt": [f"a photo number {i}" for i in range(n)],
                "class_ids": cls,
                "image": [f"../generate/images/{j}.png" for j in k],
                "cf_image": [f"../generate/counterfactual/{j}.png" for j in k],
                "mask": [f"../label/masks/{j}.png" for j in k],
                "cf_agreement": [1.0] * n,
            }
        ),
    )
    decisions = pd.DataFrame(
        {"id": ids, "kept": [True] * n, "reason": [None] * n, "reasons": [[]] * n}
    )
    write_manifest(root / "filter", decisions, name="decisions.parquet")


def child(kind: str, root: Path, out: Path, shard_size: str) -> None:
    """One export in this process; prints its seconds and peak RSS as JSON."""
    t = time.perf_counter()
    if kind == "streamed":
        from magicseg.export.hf import export_hf

        export_hf(
            root / "filter",
            root / "vocabulary",
            root / "generate",
            out,
            shard_size=shard_size,
            progress=False,
        )
    else:
        from datasets import Dataset

        from magicseg.core.io import read_manifest
        from magicseg.core.vocabulary import Vocabulary
        from magicseg.export.hf import _fields, _plan, _rows, features, parse_size

        vocab = Vocabulary.from_frame(read_manifest(root / "vocabulary"))
        frame, _ = _rows(root / "filter", root / "generate", None, False, len(vocab))
        feats = features(vocab)
        _plan(frame, feats, parse_size(shard_size))  # the same checks as the streamed export
        rows = []
        for r in frame.itertuples(index=False):
            row = _fields(r, include_dropped=False)
            for col, path in (("image", r.image), ("counterfactual_image", r.cf_image)):
                row[col] = {"bytes": Path(path).read_bytes(), "path": None}
            row["mask"] = {"bytes": Path(r.mask).read_bytes(), "path": None}
            rows.append(row)
        out.mkdir(parents=True)
        Dataset.from_list(rows, features=feats).to_parquet(str(out / "train.parquet"))
    seconds = time.perf_counter() - t
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"seconds": round(seconds, 2), "rss_mb": round(rss_mb, 1)}))


def run_child(kind: str, root: Path, out: Path, shard_size: str) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(root / "hf-home")}
    cmd = [sys.executable, __file__, "--child", kind, "--root", str(root), "--out", str(out)]
    res = subprocess.run(
        [*cmd, "--shard-size", shard_size], env=env, capture_output=True, text=True
    )
    if res.returncode:
        raise SystemExit(res.stderr)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", type=int, default=2000, help="N (4N is measured too)")
    ap.add_argument("--size", type=int, default=128, help="image side in pixels")
    ap.add_argument("--shard-size", default="500MB")
    ap.add_argument("--skip-baseline", action="store_true")
    ap.add_argument("--child", choices=("streamed", "in_memory"), help=argparse.SUPPRESS)
    ap.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child, args.root, args.out, args.shard_size)

    kinds = ("streamed",) if args.skip_baseline else ("streamed", "in_memory")
    results: dict[tuple[str, int], dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for n in (args.samples, 4 * args.samples):
            root = Path(tmp) / f"n{n}"
            make_layout(root, n, args.size)
            for kind in kinds:
                results[kind, n] = r = run_child(kind, root, root / f"out-{kind}", args.shard_size)
                data_mb = (
                    sum(p.stat().st_size for p in (root / f"out-{kind}").rglob("*.parquet")) / 1e6
                )
                print(
                    f"{kind:>9} N={n:>6}: {r['seconds']:7.1f} s, peak RSS {r['rss_mb']:7.1f} MB, "
                    f"Parquet {data_mb:7.1f} MB"
                )
            import shutil

            shutil.rmtree(root)
    n, m = args.samples, 4 * args.samples
    for kind in kinds:
        a, b = results[kind, n], results[kind, m]
        print(
            f"{kind:>9}: peak RSS 4N/N = {b['rss_mb'] / a['rss_mb']:.2f}, "
            f"seconds 4N/N = {b['seconds'] / max(a['seconds'], 1e-9):.2f}"
        )
    if not args.skip_baseline:
        ratio = results["in_memory", m]["rss_mb"] / results["streamed", m]["rss_mb"]
        print(f"at 4N the in-memory baseline peaks at {ratio:.2f}x the streamed export's RSS")


if __name__ == "__main__":
    main()

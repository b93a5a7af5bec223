"""Oracle mIoU of a labeler against the renderer's exact masks, broken down by error kind.

Renders its own sample of procedural pairs (the template writer's prompts over the catalogue,
one or two classes each, rich or plain), labels it with ``label.grounded_proxy`` as
``params.yaml`` sets it (``--set key=value`` to change one of its keys), then once per error
kind with that kind alone switched on and once with none: what each kind costs, and the speed.
It also labels the sample with the difference labeler, for comparison.

Usage: python scripts/label_breakdown.py [--n 300] [--style rich|plain] [--set bleed=0.3 ...]
"""

import argparse
import time
from pathlib import Path

import numpy as np

from magicseg.core.catalogue import CATALOGUE
from magicseg.core.config import ProceduralGeneratorParams, load_params
from magicseg.generate.base import PromptRecord
from magicseg.generate.procedural import ProceduralGenerator
from magicseg.label import class_iou
from magicseg.label.base import LabelInput
from magicseg.label.difference import DifferenceLabeler
from magicseg.label.grounded_proxy import GroundedProxyLabeler
from magicseg.prompts.base import PromptRequest
from magicseg.prompts.counterfactual import make_counterfactual
from magicseg.prompts.template import TemplateWriter

ROOT = Path(__file__).resolve().parents[1]
KINDS = ("bleed", "miss", "clutter", "confusion")


def sample(n: int, style: str, seed: int, size: int) -> list[tuple[LabelInput, str]]:
    """``n`` labelled inputs (with oracle masks) and each pair's scene name."""
    rng = np.random.default_rng(seed)
    writer = TemplateWriter(style)
    gen = ProceduralGenerator(ProceduralGeneratorParams(), size, size)
    out = []
    for i in range(n):
        idx = rng.choice(len(CATALOGUE), 2 if rng.random() < 0.3 else 1, replace=False)
        names = tuple(CATALOGUE[j].name for j in idx)
        ids = tuple(int(j) + 1 for j in idx)
        [[prompt]] = writer.write([PromptRequest(names, 1, int(rng.integers(2**31)))])
        cf = make_counterfactual(prompt, names)
        rec = PromptRecord(f"b{i:05d}", prompt, cf, ids, names, int(rng.integers(2**31)))
        pair = gen.render(rec)
        item = LabelInput(rec.id, pair.positive, pair.counterfactual, ids, names, pair.oracle_mask)
        out.append((item, str(pair.meta["scene"])))
    return out


def score(labeler, items: list[tuple[LabelInput, str]]) -> tuple[float, float, dict, str]:
    """(oracle mIoU, labels per CPU second, mIoU per scene, the counterfactual check's
    summary: the share of samples a class was found in the counterfactual of, and the oracle
    mIoU of those against the others)."""
    start = time.process_time()
    results = labeler.label([it for it, _ in items], 255)
    rate = len(items) / (time.process_time() - start)
    per: dict[str, list[float]] = {}
    flagged: dict[bool, list[float]] = {True: [], False: []}
    for (it, scene), res in zip(items, results, strict=True):
        iou = class_iou(res.mask, it.oracle_mask, it.class_ids)
        per.setdefault(scene, []).append(iou)
        flagged[bool(res.cf_detected and any(res.cf_detected))].append(iou)
    every = [v for vs in per.values() for v in vs]
    check = (
        f"cf_detected {len(flagged[True]) / len(every):.1%} of samples, oracle mIoU "
        f"{np.mean(flagged[True]) if flagged[True] else float('nan'):.3f} flagged vs "
        f"{np.mean(flagged[False]) if flagged[False] else float('nan'):.3f} not"
    )
    per_scene = {k: float(np.mean(v)) for k, v in sorted(per.items())}
    return float(np.mean(every)), rate, per_scene, check


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=300)
    parser.add_argument("--style", choices=("rich", "plain"), default="rich")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--params", default=str(ROOT / "params.yaml"))
    parser.add_argument("--set", nargs="*", default=[], help="label.grounded_proxy key=value")
    args = parser.parse_args()

    label = load_params(args.params).label
    updates = {}
    for kv in args.set:
        key, value = kv.split("=", 1)
        updates[key] = type(getattr(label.grounded_proxy, key))(value)
    proxy = label.grounded_proxy.model_validate({**label.grounded_proxy.model_dump(), **updates})
    items = sample(args.n, args.style, args.seed, args.size)

    rows = [("as set", proxy)]
    none = proxy.model_copy(update={k: 0.0 for k in KINDS})
    rows.append(("no errors", none))
    rows += [(f"{k} only", none.model_copy(update={k: getattr(proxy, k)})) for k in KINDS]
    print(f"{args.n} {args.style} pairs at {args.size} px, seed {args.seed}")
    print(f"grounded_proxy: {proxy.model_dump()}")
    print(f"{'labeler':<28} {'oracle mIoU':>11} {'labels/CPU-s':>12}")
    scenes, checks = {}, {}
    for what, params in rows:
        miou, rate, per, checks[what] = score(GroundedProxyLabeler(params, label.difference), items)
        scenes[what] = per
        print(f"{'grounded_proxy, ' + what:<28} {miou:>11.3f} {rate:>12.0f}")
    miou, rate, per, _ = score(DifferenceLabeler(label.difference), items)
    scenes["difference"] = per
    print(f"{'difference':<28} {miou:>11.3f} {rate:>12.0f}")
    print(f"counterfactual check (as set): {checks['as set']}")
    print("per scene (as set | no errors | difference):")
    for scene in scenes["as set"]:
        print(
            f"  {scene:<8} {scenes['as set'][scene]:.3f} | {scenes['no errors'][scene]:.3f} | "
            f"{scenes['difference'][scene]:.3f}"
        )


if __name__ == "__main__":
    main()

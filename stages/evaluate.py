"""Stage `evaluate`: mIoU on held-out procedural scenes (seen vs held-out classes) and on the
enabled real benchmarks (VOC, Context, COCO-Object, LVIS)."""

from pathlib import Path

import typer

from magicseg.config import load_params
from magicseg.stage import user_errors


@user_errors
def main(
    checkpoint: Path = typer.Option(...),
    vocab: Path = typer.Option(...),
    metrics: Path = typer.Option(...),
    per_class: Path = typer.Option(..., help="per-class IoU CSV (bar plot)"),
    gallery: Path = typer.Option(..., help="overlay gallery PNG"),
    benchmarks: Path = typer.Option(..., help="per-class CSVs and galleries of the benchmarks"),
    params_file: Path = Path("params.yaml"),
) -> None:
    from magicseg.benchmarks import evaluate_all

    p = load_params(params_file)
    size = (p.generate.height, p.generate.width)
    result = evaluate_all(
        checkpoint,
        vocab,
        p.evaluate,
        p.seed,
        p.label.grounded_sam,
        metrics,
        per_class,
        gallery,
        benchmarks,
        size,
    )
    for name, m in result.items():
        if isinstance(m, dict) and "miou" in m:
            print(f"evaluate: {name} mIoU {m['miou']}")


if __name__ == "__main__":
    typer.run(main)

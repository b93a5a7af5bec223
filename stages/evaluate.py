"""Stage `evaluate`: the trained segmenter (or the Grounded-SAM or SAM 3 baseline) on the
held-out procedural test set (seen vs held-out classes) and on the enabled real datasets (VOC,
Context, COCO-Object, LVIS)."""

from pathlib import Path

import typer

from magicseg.core.config import load_params
from magicseg.core.stage import user_errors


@user_errors
def main(
    checkpoint: Path = typer.Option(...),
    vocab: Path = typer.Option(...),
    metrics: Path = typer.Option(...),
    plots: Path = typer.Option(..., help="per_class/<test set>.csv and gallery/<test set>.png"),
    params_file: Path = Path("params.yaml"),
) -> None:
    from magicseg.evaluation.stage import run_evaluate

    p = load_params(params_file)
    size = (p.generate.height, p.generate.width)
    result = run_evaluate(
        checkpoint,
        vocab,
        p.evaluate,
        p.seed,
        p.label.grounded_sam,
        size,
        metrics,
        plots,
        sam3=p.label.sam3,
    )
    for name, m in result.items():
        if isinstance(m, dict) and "miou" in m:
            print(f"evaluate: {name} mIoU {m['miou']}")


if __name__ == "__main__":
    typer.run(main)

"""Stage `evaluate`: mIoU on held-out procedural scenes (seen vs held-out classes)."""

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
    params_file: Path = Path("params.yaml"),
) -> None:
    from magicseg.evaluate import evaluate

    p = load_params(params_file)
    result = evaluate(checkpoint, vocab, p.evaluate, p.seed, metrics, per_class, gallery)
    print(f"evaluate: {result}")


if __name__ == "__main__":
    typer.run(main)

"""Stage `filter`: drop bad samples with a reason each; metrics and a gallery."""

from pathlib import Path

import typer

from magicseg.core.config import load_params
from magicseg.core.stage import load_vocabulary, user_errors
from magicseg.filter import run_filter


@user_errors
def main(
    labels: Path = typer.Option(...),
    vocab: Path = typer.Option(...),
    out: Path = typer.Option(...),
    metrics: Path = typer.Option(...),
    gallery: Path = typer.Option(...),
    params_file: Path = Path("params.yaml"),
) -> None:
    p = load_params(params_file)
    kept = run_filter(labels, out, p.filter, metrics, gallery, p.seed, load_vocabulary(vocab))
    print(f"filter: kept {len(kept)} samples")


if __name__ == "__main__":
    typer.run(main)

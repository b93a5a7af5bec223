"""Stage `label`: a class-indexed mask per positive image."""

from pathlib import Path

import typer

from magicseg.core.config import load_params
from magicseg.core.stage import load_vocabulary, rank_suffix, user_errors
from magicseg.label import run_label


@user_errors
def main(
    vocab: Path = typer.Option(...),
    generated: Path = typer.Option(...),
    out: Path = typer.Option(...),
    metrics: Path = typer.Option(...),
    cache: Path | None = typer.Option(None, help="per-sample cache (outside the stage outputs)"),
    params_file: Path = Path("params.yaml"),
) -> None:
    p = load_params(params_file)
    n = len(load_vocabulary(vocab))
    frame = run_label(generated, out, p.label, num_classes=n, metrics_path=metrics, cache_dir=cache)
    done = frame["mask"].notna().sum()
    print(f"label: {done} of {len(frame)} pairs labelled by {p.label.backend}{rank_suffix()}")


if __name__ == "__main__":
    typer.run(main)

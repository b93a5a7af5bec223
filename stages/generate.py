"""Stage `generate`: a positive and a counterfactual image per prompt, from the same seed."""

from pathlib import Path

import typer

from magicseg.core.config import load_params
from magicseg.core.stage import load_vocabulary, rank_suffix, user_errors
from magicseg.generate import run_generate


@user_errors
def main(
    vocab: Path = typer.Option(...),
    prompts: Path = typer.Option(...),
    out: Path = typer.Option(...),
    cache: Path | None = typer.Option(None, help="per-sample cache (outside the stage outputs)"),
    params_file: Path = Path("params.yaml"),
) -> None:
    p = load_params(params_file)
    n = len(load_vocabulary(vocab))
    frame = run_generate(prompts, out, p.generate, num_classes=n, cache_dir=cache)
    print(f"generate: {len(frame)} pairs by {p.generate.backend}{rank_suffix()}")


if __name__ == "__main__":
    typer.run(main)

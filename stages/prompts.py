"""Stage `prompts`: 1-2 classes per request -> scene descriptions + counterfactual twins."""

from pathlib import Path

import typer

from magicseg.core.config import load_params
from magicseg.core.stage import load_vocabulary, user_errors
from magicseg.prompts.stage import run_prompts


@user_errors
def main(
    vocab: Path = typer.Option(...),
    out: Path = typer.Option(...),
    metrics: Path = typer.Option(...),
    cache: Path = typer.Option(..., help="LLM answer cache (outside the stage outputs)"),
    params_file: Path = Path("params.yaml"),
) -> None:
    p = load_params(params_file)
    frame = run_prompts(load_vocabulary(vocab), p.prompts, p.seed, out, metrics, cache_dir=cache)
    print(f"prompts: {len(frame)} descriptions written by {p.prompts.writer}")


if __name__ == "__main__":
    typer.run(main)

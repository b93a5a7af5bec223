"""Stage `train`: the open-vocabulary segmenter on the filtered dataset."""

from pathlib import Path

import typer

from magicseg.core.config import load_params
from magicseg.core.io import write_json
from magicseg.core.stage import user_errors


@user_errors
def main(
    data: Path = typer.Option(..., help="filter stage output"),
    vocab: Path = typer.Option(...),
    out: Path = typer.Option(..., help="checkpoint directory"),
    metrics: Path = typer.Option(...),
    live: Path = typer.Option(..., help="dvclive directory (training curves)"),
    state: Path | None = typer.Option(
        None, help="resumable training states (kept across dvc repro); none: keep no state"
    ),
    params_file: Path = Path("params.yaml"),
) -> None:
    from magicseg.training.loop import train

    p = load_params(params_file)
    result = train(data, vocab, p.train, p.seed, out, live, state)
    write_json(metrics, result)
    print(f"train: {result['steps']} steps, val mIoU {result['val_miou']}")


if __name__ == "__main__":
    typer.run(main)

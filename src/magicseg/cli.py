"""The ``magicseg`` command line: ``predict`` with a trained checkpoint, ``info`` on this setup.

User errors (:class:`magicseg.errors.MagicsegError`) print one line and exit with status 2.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer

from magicseg.errors import MagicsegError

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)


def _user_errors(fn: Callable) -> Callable:
    """Turn a MagicsegError into one line on stderr and exit status 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except MagicsegError as err:
            typer.echo(f"error: {err}", err=True)
            raise typer.Exit(err.exit_code) from None

    return wrapper


@app.command()
@_user_errors
def predict(
    images: Annotated[list[Path], typer.Argument(help="Image files (PNG, JPEG, ...).")],
    classes: Annotated[str, typer.Option(help='Comma-separated class names: "a,b,c".')],
    checkpoint: Annotated[Path, typer.Option(help="A model.pt written by the train stage.")],
    out: Annotated[Path, typer.Option(help="Output directory.")] = Path("predictions"),
    bg_threshold: Annotated[
        float | None, typer.Option(help="Background below this class probability.")
    ] = None,
) -> None:
    """Segment IMAGES into CLASSES: writes <out>/<name>.mask.png (class indices: 0 =
    background, k = the k-th class of --classes) and <name>.overlay.png (with a legend;
    images under 256 px are enlarged there)."""
    import numpy as np

    from magicseg.io import read_image, write_image, write_mask
    from magicseg.model import load_checkpoint
    from magicseg.model.predictor import Predictor, to_tensor
    from magicseg.viz import legend, overlay, palette, stack_vertical, upscale

    # 1. Check the inputs before loading anything heavy.
    names = [c.strip() for c in classes.split(",") if c.strip()]
    if not names:
        raise MagicsegError("--classes: give at least one class name")
    if len(set(names)) != len(names):
        raise MagicsegError("--classes: duplicate class names")
    arrays = [read_image(p) for p in images]

    # 2. Model and class embeddings.
    predictor = Predictor(load_checkpoint(checkpoint), bg_threshold=bg_threshold)
    predictor.set_classes(names)
    colours = palette(len(names))

    # 3. One image at a time (sizes may differ).
    for path, image in zip(images, arrays, strict=True):
        mask = predictor.segment(to_tensor([image]))[0].numpy()
        write_mask(out / f"{path.stem}.mask.png", mask, len(names))
        present = [int(c) for c in np.unique(mask) if c > 0]
        shown = upscale(overlay(image, mask, colours), max(1, 256 // max(image.shape[:2])))
        key = legend([names[c - 1] for c in present], [colours[c] for c in present], shown.shape[1])
        write_image(out / f"{path.stem}.overlay.png", stack_vertical(shown, key))
        areas = {names[c - 1]: round(float((mask == c).mean()), 4) for c in present}
        typer.echo(f"{path}: {json.dumps(areas)}")


@app.command()
@_user_errors
def info(
    params: Annotated[Path, typer.Option(help="params.yaml to read the profile from.")] = Path(
        "params.yaml"
    ),
) -> None:
    """The profile in params.yaml (if present), the registered backends, and which models can
    run offline here."""
    import magicseg
    from magicseg.config import load_params
    from magicseg.generate import GENERATORS
    from magicseg.label import LABELERS
    from magicseg.model import MODELS, TEXT_ENCODERS, available_offline
    from magicseg.prompts import WRITERS

    typer.echo(f"magicseg {magicseg.__version__}")
    if params.is_file():
        p = load_params(params)
        typer.echo(
            f"profile: {p.profile} ({params}): vocabulary={p.vocabulary.source}, "
            f"prompts={p.prompts.writer}, generate={p.generate.backend}, "
            f"label={p.label.backend}, train={p.train.model}"
        )
    else:
        typer.echo(f"profile: none ({params} not found)")
    for kind, reg in (
        ("prompt writers", WRITERS),
        ("generators", GENERATORS),
        ("labelers", LABELERS),
        ("models", MODELS),
        ("text encoders", TEXT_ENCODERS),
    ):
        typer.echo(f"{kind}: {', '.join(reg.names())}")
    offline = available_offline()
    typer.echo(
        "models available offline: "
        + ", ".join(f"{k} ({'yes' if v else 'no'})" for k, v in sorted(offline.items()))
    )


if __name__ == "__main__":
    app()

"""Stage `check`: the pre-flight of the composed params (models, LLM endpoint, benchmark
roots, disk, devices), before any expensive stage; one line per check, exit 2 on a failure.
Its output holds the verdict alone: a pre-flight that passes again re-runs nothing downstream."""

from pathlib import Path

import typer

from magicseg.core.config import load_params
from magicseg.core.stage import user_errors


@user_errors
def main(out: Path = typer.Option(...), params_file: Path = Path("params.yaml")) -> None:
    from magicseg.preflight import preflight

    checks = preflight(load_params(params_file), report_path=out)
    warnings = sum(c.status == "warning" for c in checks)
    print(f"check: passed ({len(checks)} checks, {warnings} warnings)")


if __name__ == "__main__":
    typer.run(main)

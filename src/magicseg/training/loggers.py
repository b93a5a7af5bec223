"""Training-curve loggers: dvclive (the DVC default), wandb, or none.

A logger sees only values that are functions of the params, the data and the step (no
wall-clock), so the dvclive folder, a DVC output tracked by git, has the same bytes every run;
a resumed run replays the records of the steps before its start first.
"""

from __future__ import annotations

from pathlib import Path

from magicseg.core.errors import ConfigError


class NullLogger:
    def log(self, metrics: dict[str, float], step: int) -> None:
        pass

    def close(self) -> None:
        pass


class DvcLiveLogger:
    """dvclive that never touches ``dvc.yaml`` nor makes DVC experiments: curves in
    ``<dir>/plots/metrics/<name>.tsv``, the last values in ``<dir>/metrics.json``."""

    def __init__(self, directory: str | Path, params: dict) -> None:
        from dvclive import Live

        self.live = Live(str(directory), dvcyaml=None, save_dvc_exp=False, report=None)
        self.live.log_params(params)

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.live.step = step
        for name, value in metrics.items():
            self.live.log_metric(name, value)
        self.live.make_summary()

    def close(self) -> None:
        self.live.end()


class WandbLogger:
    def __init__(self, directory: str | Path | None, params: dict) -> None:
        try:
            import wandb
        except ImportError:
            raise ConfigError(
                "train.logger: 'wandb' needs the wandb package (pip install 'magicseg[wandb]')"
            ) from None
        self.run = wandb.init(project="magicseg", config=params, dir=str(directory or "."))

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def close(self) -> None:
        self.run.finish()


def make_logger(kind: str, directory: str | Path | None, params: dict):
    """``kind``: dvclive (needs ``directory``; without one nothing is logged), wandb, none."""
    if kind == "none" or (kind == "dvclive" and directory is None):
        return NullLogger()
    if kind == "dvclive":
        return DvcLiveLogger(directory, params)
    if kind == "wandb":
        return WandbLogger(directory, params)
    raise ConfigError(f"train.logger: unknown {kind!r} (allowed: dvclive, wandb, none)")

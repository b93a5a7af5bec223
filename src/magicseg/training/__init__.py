"""The learning half: one training loop for every registered model.

- :mod:`magicseg.training.data`: the filter manifest as an index, items read from disk as they
  are needed, the seeded batch plan, category sampling, target remapping, augmentation;
- :mod:`magicseg.training.loop`: the accelerate loop (optimiser and schedule from params,
  resumable state, validation, checkpoint), :func:`magicseg.training.loop.train`;
- :mod:`magicseg.training.loggers`: dvclive, wandb or none.

Training code depends on :mod:`magicseg.model`, never the other way round.
"""

"""magicseg: class names in, a segmentation dataset and an open-vocabulary segmenter out.

This package root holds the version and the error classes only; importing it loads no model,
no trainer and no torch. The library's layers: :mod:`magicseg.core` (what every stage runs),
the data stages (``prompts``, ``generate``, ``label``, ``filter``), the learning half
(``model``, ``train``), :mod:`magicseg.inference` (``from magicseg.inference import
predict``) and :mod:`magicseg.evaluation`.
"""

from magicseg.core.errors import BackendError, ConfigError, DataError, MagicsegError

__version__ = "0.1.0"

__all__ = ["BackendError", "ConfigError", "DataError", "MagicsegError", "__version__"]

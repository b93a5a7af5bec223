"""magicseg: class names in, a segmentation dataset and an open-vocabulary segmenter out."""

from magicseg.errors import BackendError, ConfigError, DataError, MagicsegError

__version__ = "0.1.0"

__all__ = ["BackendError", "ConfigError", "DataError", "MagicsegError", "__version__"]

"""magicseg: class names in, a segmentation dataset and an open-vocabulary segmenter out."""

from magicseg.errors import BackendError, ConfigError, DataError, MagicsegError

__version__ = "0.1.0"


def predict(images, classes, checkpoint, **kwargs):
    """Segment images into classes with a trained model; one HxW int64 mask per image.
    See :func:`magicseg.inference.predict` (imported on first use: torch is heavy)."""
    from magicseg.inference import predict as _predict

    return _predict(images, classes, checkpoint, **kwargs)


__all__ = ["BackendError", "ConfigError", "DataError", "MagicsegError", "__version__", "predict"]

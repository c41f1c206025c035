"""Training stage: discriminator-based importance weights and the weighted segmentation network."""

from .params import TrainParams


def train_model(*args, **kwargs):
    """See :func:`nucseg.train.fit.train_model` (imported lazily: Lightning is slow to import)."""
    from .fit import train_model as _train_model

    return _train_model(*args, **kwargs)


__all__ = ["TrainParams", "train_model"]

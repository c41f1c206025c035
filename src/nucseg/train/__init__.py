"""Training stage: discriminator-based importance weights and the weighted segmentation network."""

from .params import ADAPT_STEPS, TrainParams


def train_model(*args, **kwargs):
    """See :func:`nucseg.train.fit.train_model` (imported lazily: Lightning is slow to import)."""
    from .fit import train_model as _train_model  # Lightning is slow to import

    return _train_model(*args, **kwargs)


def adapt_model(*args, **kwargs):
    """See :func:`nucseg.train.adapt.adapt_model` (imported lazily, as :func:`train_model`)."""
    from .adapt import adapt_model as _adapt_model  # Lightning is slow to import

    return _adapt_model(*args, **kwargs)


def adapt_to_images(*args, **kwargs):
    """See :func:`nucseg.train.adapt.adapt_to_images` (imported lazily, as :func:`train_model`)."""
    from .adapt import adapt_to_images as _adapt_to_images  # Lightning is slow to import

    return _adapt_to_images(*args, **kwargs)


__all__ = ["ADAPT_STEPS", "TrainParams", "adapt_model", "adapt_to_images", "train_model"]

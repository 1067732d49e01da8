"""featcache: train a backbone once, cache its penultimate features in content-addressed HDF5 entries.

``featcache.train_backbone(data=..., arch=..., out=...)`` and ``featcache.extract_features(ckpt=...,
data=...)`` are the ``featcache train`` / ``extract`` commands as functions."""
__version__ = "0.1.0"

__all__ = ["FeatureCache", "Split", "__version__", "extract_features", "train_backbone"]


def __getattr__(name):
    # Lazy, so that `featcache --help` does not pay for importing h5py or torch.
    if name in ("FeatureCache", "Split"):
        from . import store
        return getattr(store, name)
    if name == "extract_features":
        from .extract import extract_features
        return extract_features
    if name == "train_backbone":
        from .train import train_backbone
        return train_backbone
    raise AttributeError(f"module 'featcache' has no attribute {name!r}")

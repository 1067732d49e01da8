"""featcache: train a backbone once, cache its penultimate features in content-addressed HDF5 entries."""
__version__ = "0.1.0"

__all__ = ["FeatureCache", "Split", "__version__"]


def __getattr__(name):
    # Lazy, so that `featcache --help` does not pay for importing h5py.
    if name in ("FeatureCache", "Split"):
        from . import store
        return getattr(store, name)
    raise AttributeError(f"module 'featcache' has no attribute {name!r}")

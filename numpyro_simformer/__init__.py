"""numpyro_simformer: all-in-one simulation-based inference for NumPyro models."""

__version__ = "0.1.0"

__all__ = ["__version__"]

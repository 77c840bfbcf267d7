"""jaxsel: fast JAX/Flax marker-gene selection and gene imputation for single-cell data."""

__version__ = "0.1.0"

from . import datasets, engine, metrics, preprocessing, tl
from .estimators import (
    ConcreteVAE,
    DEMarkers,
    GlobalGumbelVAE,
    HVGMarkers,
    MarkerMap,
    RandomMarkers,
    SparseBottleneck,
)

__all__ = [
    "__version__",
    "MarkerMap",
    "ConcreteVAE",
    "GlobalGumbelVAE",
    "RandomMarkers",
    "HVGMarkers",
    "DEMarkers",
    "SparseBottleneck",
    "tl",
    "datasets",
    "metrics",
    "preprocessing",
    "engine",
]

"""jaxsel: fast JAX/Flax marker-gene selection and gene imputation for single-cell data."""

__version__ = "0.1.0"

from . import datasets, engine, metrics, plotting, preprocessing, tl
from .estimators import (
    ConcreteVAE,
    DEMarkers,
    GlobalGumbelVAE,
    HVGMarkers,
    MarkerMap,
    RandomMarkers,
    SparseBottleneck,
    SparseRRR,
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
    "SparseRRR",
    "tl",
    "datasets",
    "metrics",
    "preprocessing",
    "plotting",
    "engine",
]

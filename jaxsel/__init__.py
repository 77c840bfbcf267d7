"""jaxsel: fast JAX/Flax marker-gene selection and gene imputation for single-cell data."""

__version__ = "0.1.0"

from . import datasets, engine, imputers, metrics, plotting, preprocessing, streaming, tl
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
from ._persist import load
from .imputers import GimVI, StAI

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
    "StAI",
    "GimVI",
    "load",
    "tl",
    "datasets",
    "metrics",
    "preprocessing",
    "plotting",
    "engine",
    "imputers",
    "streaming",
]

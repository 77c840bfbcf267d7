"""jaxsel: fast JAX/Flax marker-gene selection and gene imputation for single-cell data."""

__version__ = "0.1.0"

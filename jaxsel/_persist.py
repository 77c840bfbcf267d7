"""Saving and loading fitted estimators: one portable ``.npz`` file, no pickle.

The file holds every array of the estimator (parameters, optimiser-free fitted
attributes, histories, the data inference needs) as an ``.npz`` entry, and a JSON header
with the format, the jaxsel version, the estimator's class and constructor parameters,
and the structure that puts the arrays back in place: dicts, lists, tuples, named tuples
and dataclasses (configs, results), numpy scalars with their dtype, and which arrays
were JAX arrays. Only jaxsel's own classes are rebuilt from a header, so loading a file
runs no code the file names. Round trips are exact: the same bytes in every array, the
same dtypes, the same containers.

A file written by a jaxsel release with another major.minor version is refused with
the version that wrote it: the estimators' attributes may differ between releases.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import numbers
import os
import zipfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["PersistMixin", "load", "save"]

FORMAT = "jaxsel.estimator/1"


def _version() -> str:
    from . import __version__

    return __version__


def _class_name(cls) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def _import_class(name: str, path):
    module, _, qual = name.partition(":")
    if not (module == "jaxsel" or module.startswith("jaxsel.")):
        raise ValueError(f"{path}: the header names {name!r}; only jaxsel classes are loaded.")
    obj = importlib.import_module(module)
    for part in qual.split("."):
        obj = getattr(obj, part, None)
    if not isinstance(obj, type):
        raise ValueError(f"{path}: {name!r} is not a class of this jaxsel version.")
    return obj


class _Encoder:
    def __init__(self):
        self.arrays: dict[str, np.ndarray] = {}

    def array(self, a: np.ndarray, kind: str) -> dict:
        if a.dtype == object:
            if not all(isinstance(v, str) for v in a.ravel()):
                raise TypeError("cannot save an object array that does not hold strings")
            a, kind = a.astype(str), kind + "+object"
        key = f"a{len(self.arrays)}"
        self.arrays[key] = a
        return {"__array__": key, "kind": kind, "dtype": a.dtype.str, "shape": list(a.shape)}

    def __call__(self, obj, where: str):
        if obj is None or isinstance(obj, (bool, str)):
            return obj
        if isinstance(obj, (np.generic,)):
            if isinstance(obj, np.str_):
                return {"__str__": str(obj)}
            return {"__scalar__": obj.dtype.str, "value": obj.item()}
        if isinstance(obj, numbers.Integral):
            return int(obj)
        if isinstance(obj, float):
            return {"__float__": obj.hex()}  # exact, and NaN/inf survive
        if isinstance(obj, jax.Array):
            if jnp.issubdtype(obj.dtype, jax.dtypes.prng_key):
                node = self.array(np.asarray(jax.random.key_data(obj)), "key")
                node["impl"] = str(jax.random.key_impl(obj))
                return node
            return self.array(np.asarray(obj), "jax")
        if isinstance(obj, np.ndarray):
            return self.array(obj, "numpy")
        if isinstance(obj, dict):
            return {"__dict__": [[self(k, where), self(v, f"{where}[{k!r}]")] for k, v in obj.items()]}
        if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # NamedTuple
            return {"__namedtuple__": _class_name(type(obj)),
                    "fields": {f: self(getattr(obj, f), f"{where}.{f}") for f in obj._fields}}
        if isinstance(obj, (list, tuple)):
            return {"__list__" if isinstance(obj, list) else "__tuple__":
                    [self(v, f"{where}[{i}]") for i, v in enumerate(obj)]}
        if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
            fields = {f.name: self(getattr(obj, f.name), f"{where}.{f.name}")
                      for f in dataclasses.fields(obj) if f.init}
            return {"__dataclass__": _class_name(type(obj)), "fields": fields}
        raise TypeError(f"cannot save {where}: a {type(obj).__name__} (arrays, numbers, strings, containers, "
                        "jaxsel configs and results only)")


def _decode(node, arrays, path):
    if node is None or isinstance(node, (bool, int, str)):
        return node
    if isinstance(node, list):
        raise ValueError(f"{path}: malformed header")
    if "__array__" in node:
        key = node["__array__"]
        if key not in arrays:
            raise ValueError(f"{path}: array {key} is missing.")
        a = arrays[key]
        if list(a.shape) != node["shape"] or a.dtype.str != node["dtype"]:
            raise ValueError(f"{path}: array {key} has the wrong shape or dtype ({a.shape}, {a.dtype}; the header "
                             f"says {tuple(node['shape'])}, {node['dtype']}).")
        kind = node["kind"]
        if kind.endswith("+object"):
            a, kind = a.astype(object), kind[: -len("+object")]
        if kind == "jax":
            return jnp.asarray(a)
        if kind == "key":
            return jax.random.wrap_key_data(jnp.asarray(a), impl=node["impl"])
        return a
    if "__str__" in node:
        return np.str_(node["__str__"])
    if "__scalar__" in node:
        return np.dtype(node["__scalar__"]).type(node["value"])
    if "__float__" in node:
        return float.fromhex(node["__float__"])
    if "__dict__" in node:
        return {_decode(k, arrays, path): _decode(v, arrays, path) for k, v in node["__dict__"]}
    if "__list__" in node:
        return [_decode(v, arrays, path) for v in node["__list__"]]
    if "__tuple__" in node:
        return tuple(_decode(v, arrays, path) for v in node["__tuple__"])
    if "__namedtuple__" in node or "__dataclass__" in node:
        cls = _import_class(node.get("__namedtuple__") or node["__dataclass__"], path)
        fields = {k: _decode(v, arrays, path) for k, v in node["fields"].items()}
        try:
            return cls(**fields)
        except TypeError as err:
            raise ValueError(f"{path}: cannot rebuild {cls.__name__} ({err}); was it written by another jaxsel "
                             "version?") from None
    raise ValueError(f"{path}: malformed header")


def read_npz(path, fmt: str, what: str, advice: str):
    """``(header, arrays)`` of an ``.npz`` written with a JSON ``__header__`` of format
    ``fmt`` by this jaxsel major.minor version; a clear ``ValueError`` (naming ``what``
    the file should hold, and ``advice`` for another version) otherwise."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a file path (str or os.PathLike), got {path!r}.")
    if not Path(path).is_file():
        raise FileNotFoundError(f"no jaxsel {what} file at {path}.")
    try:
        f = np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as err:
        raise ValueError(f"{path} is not a jaxsel {what} file ({err}).") from None
    with f:
        if "__header__" not in f.files:
            raise ValueError(f"{path} is not a jaxsel {what} file (no header).")
        header = json.loads(str(f["__header__"]))
        arrays = {k: f[k] for k in f.files if k != "__header__"}
    if header.get("format") != fmt:
        raise ValueError(f"{path} holds {header.get('format')!r}, not a jaxsel {what} ({fmt}).")
    saved, ours = str(header.get("jaxsel_version", "?")), _version()
    if saved.split(".")[:2] != ours.split(".")[:2]:
        raise ValueError(f"{path} was written by jaxsel {saved}; this is jaxsel {ours}: {advice}")
    return header, arrays


def _npz_path(path) -> str:
    path = str(Path(path))
    return path if path.endswith(".npz") else path + ".npz"


def save(est, path) -> str:
    """Write the fitted ``est`` to ``path`` (``.npz`` added when missing); returns the path.

    Saves the constructor parameters and every attribute ``fit`` set, except those an
    estimator names in its ``_persist_skip`` mapping (attribute -> the value it loads
    as; gimVI's copy of the reference counts, for instance). A ``random_state``
    that is a :class:`numpy.random.Generator` is saved as the seed ``fit`` resolved
    (``seed_``) when the estimator keeps one, else refused (pass an int to save it).
    """
    from sklearn.utils.validation import check_is_fitted

    check_is_fitted(est)
    params = est.get_params(deep=False)
    if "random_state" in params and not (params["random_state"] is None
                                         or isinstance(params["random_state"], numbers.Integral)):
        if not hasattr(est, "seed_"):
            raise TypeError(f"{type(est).__name__}.save needs random_state to be an int or None, got "
                            f"{type(params['random_state']).__name__}: refit with an int seed to save it.")
        params["random_state"] = int(est.seed_)
    skip = set(getattr(est, "_persist_skip", {}))  # attribute -> value it loads as
    fitted = {k: v for k, v in vars(est).items() if k not in params and k not in skip}
    fitted.update({k: v for k, v in getattr(est, "_persist_skip", {}).items() if k in vars(est)})
    enc = _Encoder()
    header = {
        "format": FORMAT,
        "jaxsel_version": _version(),
        "class": _class_name(type(est)),
        "params": enc(params, "params"),
        "fitted": enc(fitted, "attributes"),
    }
    out = _npz_path(path)
    arrays = dict(enc.arrays)
    arrays["__header__"] = np.array(json.dumps(header))
    with open(out, "wb") as fh:
        np.savez(fh, **arrays)
    return out


def load(path, cls=None):
    """Read an estimator written by :func:`save` (any jaxsel estimator, or ``cls`` only).

    Raises ``ValueError`` for a file that is not a jaxsel estimator, one of another class
    than ``cls``, one written by a jaxsel release with another major.minor version, and
    a damaged file (missing arrays, wrong shapes).
    """
    what = "estimator" if cls is None else cls.__name__
    header, arrays = read_npz(path, FORMAT, what, "its estimators may differ: load it with the version that wrote it.")
    klass = _import_class(header["class"], path)
    if cls is not None and klass is not cls:
        raise ValueError(f"{path} holds a {klass.__name__}, not a jaxsel {cls.__name__}.")
    est = klass(**_decode(header["params"], arrays, path))
    for k, v in _decode(header["fitted"], arrays, path).items():
        setattr(est, k, v)
    return est


class PersistMixin:
    """``save(path)`` and ``load(path)`` for an estimator (see :mod:`jaxsel._persist`)."""

    def save(self, path) -> str:
        """Write the fitted estimator to one portable ``.npz`` file (no pickle): its
        parameters, every fitted attribute and the jaxsel version. Returns the path
        written (``.npz`` is added when missing). :meth:`load` restores it exactly."""
        return save(self, path)

    @classmethod
    def load(cls, path):
        """Read an estimator of this class written by :meth:`save`. A file of another
        class, from a jaxsel release with another major.minor version, or damaged, is a
        ``ValueError`` saying which."""
        return load(path, cls)

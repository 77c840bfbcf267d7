"""Reference half of the side-by-side benchmark: MarkerMap 1.0.3 (PyTorch Lightning).

This module drives the *published* MarkerMap package (PyPI ``markermap==1.0.3``) so
that the benchmark can time it next to jaxsel in the same process. Nothing from
MarkerMap is copied here: the models are built from ``markermap.vae_models`` and
trained by its own ``train_model`` (Lightning ``Trainer`` + ``LearningRateFinder``
+ ``EarlyStopping``). We only add a timing callback and choose the arguments.

Install (needs the optional ``bench`` extra; torch pinned to the CPU build)::

    pip install -e ".[bench]" -c benchmarks/constraints.txt

API
---
``import_markermap()``
    Registers an empty stand-in module ``persist`` (markermap imports Covert's
    PERSIST at import time but MarkerMap never calls it), sets torch threads to
    ``os.cpu_count()``, imports and returns ``markermap.vae_models``.
``run_reference(model_name, x_train, y_train, x_val, y_val, **kw) -> dict``
    Fits one reference model and returns markers and timings (see its docstring).
``preprocess_counts(X)`` / ``split_indices(n, seed)``
    numpy versions of the paper's preprocessing and a 70/10/20 split, used by the
    smoke test (``python benchmarks/reference_markermap.py``).

Paper-benchmark settings (MarkerMap repo, ``scripts/benchmark_k.py``): hidden 256,
latent 16, batch 64, k 50, t = 3.0, 25 to 100 epochs, LR finder in ``linear`` mode over
500 steps with max_lr 1e-3 (supervised) / 1e-4 (unsupervised, joint, Concrete VAE) /
1e-5 (global gate); early-stopping patience 3, except 4 for the unsupervised
MarkerMap and 10 for the global gate.
"""
from __future__ import annotations

import functools
import os
import random
import resource
import statistics
import sys
import tempfile
import threading
import time
import types

import numpy as np

# Per-model settings of the reference paper benchmark (scripts/benchmark_k.py).
#   max_lr: upper end of the LR-finder sweep; patience: EarlyStopping patience.
MODEL_DEFAULTS = {
    "supervised": dict(max_lr=1e-3, patience=3),
    "unsupervised": dict(max_lr=1e-4, patience=4),
    "joint": dict(max_lr=1e-4, patience=3),
    "concrete_vae": dict(max_lr=1e-4, patience=3),
    "global_gumbel": dict(max_lr=1e-5, patience=10),
}
_ALIASES = {"global_gate": "global_gumbel", "mixed": "joint", "concrete": "concrete_vae"}
MODEL_NAMES = tuple(MODEL_DEFAULTS)

_VAE_MODELS = None


def _log(msg):
    print(f"[reference_markermap] {msg}", flush=True)


def import_markermap(num_threads=None):
    """Import and return ``markermap.vae_models`` (the reference implementation).

    Torch intra-op threads are set to ``num_threads``, else ``$MM_REF_TORCH_THREADS``,
    else ``os.cpu_count()``. Warning: with the default OpenMP wait policy, torch with
    2 threads on this 2-core machine slows down 10-40x whenever another process is using
    a core (see benchmarks/README.md); check ``loadavg_before`` in the results.

    ``markermap.other_models`` does ``import persist`` at import time. That is Ian
    Covert's PERSIST, which is not on PyPI (the PyPI project named ``persist`` is
    unrelated), and only ``PersistWrapper`` uses it. MarkerMap, the Concrete VAE and
    the global gate never touch it, so an empty stand-in module is registered under
    that name when the real one is not importable. A line is printed when that happens.
    """
    global _VAE_MODELS
    if _VAE_MODELS is not None:
        return _VAE_MODELS
    import torch

    n = num_threads or int(os.environ.get("MM_REF_TORCH_THREADS", 0)) or os.cpu_count() or 1
    torch.set_num_threads(n)
    _log(f"torch {torch.__version__}: set_num_threads({n}), "
         f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')}")

    if "persist" not in sys.modules:
        try:  # a real PERSIST install (exposes PERSIST) would be used as is
            import persist as _p  # noqa: F401

            if not hasattr(_p, "PERSIST"):
                raise ImportError("not Covert's PERSIST")
        except ImportError:
            sys.modules["persist"] = types.ModuleType("persist")
            sys.modules["persist"].__doc__ = "empty stand-in registered by benchmarks/reference_markermap.py"
            _log(
                "registered an EMPTY stand-in module for 'persist' (Covert's PERSIST, not on "
                "PyPI); markermap imports it at import time, MarkerMap never calls it"
            )

    t0 = time.perf_counter()
    import markermap.vae_models as vae_models  # heavy: scanpy, umap/numba, lassonet, lightning

    import markermap
    import pytorch_lightning as pl

    ver = getattr(markermap, "__version__", None)
    if ver is None:
        from importlib.metadata import version

        ver = version("markermap")
    _log(
        f"imported markermap {ver} (pytorch_lightning {pl.__version__}) "
        f"in {time.perf_counter() - t0:.1f} s"
    )
    _VAE_MODELS = vae_models
    return vae_models


def seed_all(seed):
    """Seed python, numpy and torch global RNGs (DataLoader shuffling, init, Gumbel noise)."""
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class _RSSSampler:
    """Background thread sampling this process's RSS (psutil) every ``interval`` s."""

    def __init__(self, interval=0.05):
        import psutil

        self._proc = psutil.Process()
        self.interval = interval
        self.start_mb = self._proc.memory_info().rss / 2**20
        self.peak_mb = self.start_mb
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.wait(self.interval):
            self.peak_mb = max(self.peak_mb, self._proc.memory_info().rss / 2**20)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak_mb = max(self.peak_mb, self._proc.memory_info().rss / 2**20)


def _cpu_busy_s():
    """(CPU seconds all processes of the machine were busy, CPU seconds of this process)."""
    import psutil

    t = psutil.cpu_times()
    busy = sum(t) - t.idle - getattr(t, "iowait", 0.0)
    own = psutil.Process().cpu_times()
    return busy, own.user + own.system


def _make_timer_callback(pl):
    class EpochTimer(pl.Callback):
        """Times the real training run. Its hooks do not fire during the LR finder,
        which swaps ``trainer.callbacks`` for its own callback while it sweeps."""

        def __init__(self):
            self.fit_start = None  # set by the Trainer wrapper just before fit()
            self.train_start = None
            self.train_end = None
            self.epoch_s = []  # on_train_epoch_start -> on_train_epoch_end (incl. validation)
            self.val_s = []  # validation time inside each epoch (sanity check excluded)
            self._ep0 = None
            self._v0 = None
            self._val_this_epoch = 0.0

        def on_train_start(self, trainer, pl_module):
            self.train_start = time.perf_counter()

        def on_train_epoch_start(self, trainer, pl_module):
            self._val_this_epoch = 0.0
            self._ep0 = time.perf_counter()

        def on_validation_epoch_start(self, trainer, pl_module):
            if not trainer.sanity_checking:
                self._v0 = time.perf_counter()

        def on_validation_epoch_end(self, trainer, pl_module):
            if not trainer.sanity_checking and self._v0 is not None:
                self._val_this_epoch += time.perf_counter() - self._v0
                self._v0 = None

        def on_train_epoch_end(self, trainer, pl_module):
            self.epoch_s.append(time.perf_counter() - self._ep0)
            self.val_s.append(self._val_this_epoch)

        def on_train_end(self, trainer, pl_module):
            self.train_end = time.perf_counter()

    return EpochTimer()


class _PLProxy(types.ModuleType):
    """Stands in for ``pytorch_lightning`` inside ``markermap.vae_models`` during one
    ``train_model`` call, so that its ``pl.Trainer(...)`` gets our timing callback and a
    temporary ``default_root_dir`` (the LR finder writes a checkpoint there)."""

    def __init__(self, real, trainer_cls):
        super().__init__(real.__name__)
        self._real = real
        self.Trainer = trainer_cls

    def __getattr__(self, name):
        return getattr(self._real, name)


def _build_model(vm, name, input_size, num_classes, k, hidden, latent, lr):
    common = dict(input_size=input_size, hidden_layer_size=hidden, z_size=latent, k=k, batch_norm=True)
    if lr is not None:
        common["lr"] = lr
    if name == "supervised":
        return vm.MarkerMap(num_classes=num_classes, t=3.0, temperature_decay=0.95, loss_tradeoff=0.0, **common)
    if name == "joint":
        return vm.MarkerMap(num_classes=num_classes, t=3.0, temperature_decay=0.95, loss_tradeoff=0.5, **common)
    if name == "unsupervised":
        return vm.MarkerMap(num_classes=None, t=3.0, temperature_decay=0.95, loss_tradeoff=1.0, **common)
    if name == "concrete_vae":
        # paper script passes t=3.0 and keeps the class default temperature_decay (0.99)
        return vm.ConcreteVAE_NMSL(t=3.0, **common)
    if name == "global_gumbel":
        return vm.VAE_Gumbel_GlobalGate(t=3.0, temperature_decay=0.95, **common)
    raise ValueError(f"unknown model {name!r}; choose from {MODEL_NAMES}")


def run_reference(
    model_name,
    x_train,
    y_train,
    x_val,
    y_val,
    *,
    k=50,
    hidden=256,
    latent=16,
    batch_size=64,
    min_epochs=25,
    max_epochs=100,
    patience=None,
    lr=None,
    max_lr=None,
    lr_mode="linear",
    num_lr_rates=500,
    seed=0,
    fixed_epochs=None,
    num_classes=None,
    verbose=False,
):
    """Fit one reference model with ``markermap.vae_models.train_model``; return markers and timings.

    model_name: "supervised" | "unsupervised" | "joint" (MarkerMap with loss_tradeoff
        0 / 1 / 0.5, t=3.0, temperature_decay=0.95), "concrete_vae" (ConcreteVAE_NMSL,
        t=3.0), "global_gumbel" (VAE_Gumbel_GlobalGate, t=3.0, temperature_decay=0.95).
    x_*: preprocessed float32 arrays (cells x genes); y_*: integer labels (may be None
        for "unsupervised"; zeros are then fed to the loaders, which the model ignores).
    patience / max_lr: None -> the paper-benchmark value of that model (MODEL_DEFAULTS).
    lr: None -> LR finder (``auto_lr=True``, ``lr_mode`` over ``num_lr_rates`` steps from
        1e-8 to max_lr, as in the paper script). A number -> that fixed LR, no finder.
    fixed_epochs: train exactly this many epochs: LR finder off (lr, or max_lr when lr is
        None), early stopping made unable to fire. train_model asserts
        max_epochs > min_epochs, so it is called with min_epochs = fixed_epochs - 1,
        max_epochs = fixed_epochs and an infinite patience.

    Loaders are built as markermap.utils.get_dataloader builds them: TensorDataset of
    float32 X and int64 y, batch_size, shuffle=True for train / False for val,
    drop_last=False, num_workers=0.

    Returned dict:
      markers (np.int64[k]) from model.markers(); wall_s: model construction + whole
      train_model call (Trainer setup, sanity check, LR finder, training) + markers();
      lr_find_s: fit() start -> start of the real training run (LR sweep plus the small
      Trainer setup), None without the finder; train_s: real training run (all epochs incl.
      validation); epochs (trainer.current_epoch after fit) and epochs_timed (epochs seen
      by the timing callback); s_per_epoch: median epoch time from the callback
      (train + validation of that epoch); s_per_epoch_train_only: median of (epoch -
      validation); first_epoch_s; min_epoch_s (the fastest epoch: a lower bound that
      survives contamination by other processes); epoch_times_s (list); steps_per_epoch;
      peak_rss_mb: highest RSS of the process sampled by a psutil thread every 50 ms
      during the fit (absolute); rss_before_mb; peak_rss_delta_mb = peak - before;
      ru_maxrss_mb: resource.getrusage peak of the process lifetime, for comparison;
      lr: learning rate used for training (finder suggestion or fixed); lr_finder_steps;
      lr_suggestion_failed (True when the finder gave no suggestion so the class default
      lr 1e-6 stayed); other_cpu_frac: CPU time used by OTHER processes during the fit,
      as a fraction of wall_s x cores (psutil); above ~0.05 the timings are contaminated
      by a concurrent job (torch's OpenMP threads degrade badly, see README);
      loadavg_before / loadavg_after (os.getloadavg(): 1, 5, 15 min); model, settings.
    """
    name = _ALIASES.get(model_name, model_name)
    if name not in MODEL_DEFAULTS:
        raise ValueError(f"unknown model {model_name!r}; choose from {MODEL_NAMES}")
    vm = import_markermap()
    import pytorch_lightning as pl
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    defaults = MODEL_DEFAULTS[name]
    max_lr = defaults["max_lr"] if max_lr is None else max_lr
    patience = defaults["patience"] if patience is None else patience

    x_train = np.asarray(x_train, dtype=np.float32)
    x_val = np.asarray(x_val, dtype=np.float32)
    if y_train is None:
        y_train = np.zeros(len(x_train), dtype=np.int64)
    if y_val is None:
        y_val = np.zeros(len(x_val), dtype=np.int64)
    y_train = np.asarray(y_train, dtype=np.int64)
    y_val = np.asarray(y_val, dtype=np.int64)
    if num_classes is None:
        num_classes = int(max(y_train.max(), y_val.max())) + 1

    if fixed_epochs is not None:
        fixed_epochs = int(fixed_epochs)
        if fixed_epochs < 1:
            raise ValueError("fixed_epochs must be >= 1")
        train_lr = max_lr if lr is None else lr
        auto_lr = False
        tm_kwargs = dict(min_epochs=fixed_epochs - 1, max_epochs=fixed_epochs,
                         early_stopping_patience=10**9)
    else:
        train_lr = lr
        auto_lr = lr is None
        tm_kwargs = dict(min_epochs=min_epochs, max_epochs=max_epochs, early_stopping_patience=patience)

    seed_all(seed)
    train_dl = DataLoader(TensorDataset(torch.Tensor(x_train), torch.LongTensor(y_train)),
                          batch_size=batch_size, shuffle=True, num_workers=0)
    val_dl = DataLoader(TensorDataset(torch.Tensor(x_val), torch.LongTensor(y_val)),
                        batch_size=batch_size, shuffle=False, num_workers=0)

    timer = _make_timer_callback(pl)
    workdir = tempfile.mkdtemp(prefix="mm_ref_")

    class _TimedTrainer(pl.Trainer):
        def __init__(self, *args, callbacks=None, **kwargs):
            kwargs.setdefault("default_root_dir", workdir)
            super().__init__(*args, callbacks=list(callbacks or []) + [timer], **kwargs)

        def fit(self, *args, **kwargs):
            timer.fit_start = time.perf_counter()
            return super().fit(*args, **kwargs)

    real_pl = vm.pl
    load_before = os.getloadavg()
    busy0, own0 = _cpu_busy_s()
    sampler = _RSSSampler()
    with sampler:
        t0 = time.perf_counter()
        model = _build_model(vm, name, x_train.shape[1], num_classes, k, hidden, latent, train_lr)
        vm.pl = _PLProxy(real_pl, _TimedTrainer)
        finder_mod = sys.modules.get("pytorch_lightning.tuner.lr_finder")
        real_tqdm = getattr(finder_mod, "tqdm", None)
        if not verbose and real_tqdm is not None:
            # the LR finder draws its own tqdm bar ("Finding best initial lr") even with
            # enable_progress_bar=False; silence it unless verbose
            finder_mod.tqdm = functools.partial(real_tqdm, disable=True)
        try:
            trainer = vm.train_model(
                model, train_dl, val_dl, auto_lr=auto_lr, max_lr=max_lr,
                lr_explore_mode=lr_mode, num_lr_rates=num_lr_rates, verbose=verbose, **tm_kwargs,
            )
        finally:
            vm.pl = real_pl
            if real_tqdm is not None:
                finder_mod.tqdm = real_tqdm
        markers = model.markers()
        markers = markers.clone().cpu().detach().numpy().astype(np.int64)
        wall_s = time.perf_counter() - t0
    busy1, own1 = _cpu_busy_s()
    other_cpu_frac = max(0.0, (busy1 - busy0) - (own1 - own0)) / (wall_s * (os.cpu_count() or 1))
    try:
        os.rmdir(workdir)
    except OSError:
        pass

    lr_finder_steps = None
    suggestion_failed = None
    if auto_lr:
        finder_cb = next(cb for cb in trainer.callbacks if isinstance(cb, pl.callbacks.LearningRateFinder))
        res = getattr(finder_cb, "optimal_lr", None)
        if res is not None:
            lr_finder_steps = len(res.results.get("lr", []))
            suggestion_failed = res.suggestion() is None

    epochs_s = timer.epoch_s
    train_only = [e - v for e, v in zip(epochs_s, timer.val_s)]
    train_s = (timer.train_end - timer.train_start) if timer.train_start and timer.train_end else None
    lr_find_s = (timer.train_start - timer.fit_start) if auto_lr and timer.train_start else None
    return dict(
        model=name,
        markers=markers,
        wall_s=wall_s,
        lr_find_s=lr_find_s,
        train_s=train_s,
        epochs=int(trainer.current_epoch),
        epochs_timed=len(epochs_s),
        s_per_epoch=statistics.median(epochs_s) if epochs_s else None,
        s_per_epoch_train_only=statistics.median(train_only) if train_only else None,
        first_epoch_s=epochs_s[0] if epochs_s else None,
        min_epoch_s=min(epochs_s) if epochs_s else None,
        epoch_times_s=list(epochs_s),
        steps_per_epoch=len(train_dl),
        peak_rss_mb=sampler.peak_mb,
        rss_before_mb=sampler.start_mb,
        peak_rss_delta_mb=sampler.peak_mb - sampler.start_mb,
        ru_maxrss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
        other_cpu_frac=round(other_cpu_frac, 3),
        loadavg_before=[round(v, 2) for v in load_before],
        loadavg_after=[round(v, 2) for v in os.getloadavg()],
        lr=float(model.lr),
        lr_finder_steps=lr_finder_steps,
        lr_suggestion_failed=suggestion_failed,
        settings=dict(k=k, hidden=hidden, latent=latent, batch_size=batch_size,
                      min_epochs=tm_kwargs["min_epochs"], max_epochs=tm_kwargs["max_epochs"],
                      patience=tm_kwargs["early_stopping_patience"], auto_lr=auto_lr,
                      max_lr=max_lr, lr_mode=lr_mode if auto_lr else None,
                      num_lr_rates=num_lr_rates if auto_lr else None, seed=seed,
                      fixed_epochs=fixed_epochs, torch_threads=torch.get_num_threads()),
    )


# --------------------------------------------------------------------------- smoke test

def preprocess_counts(X, target_sum=1e4, max_value=10.0):
    """The paper's Paul15 preprocessing in numpy (scanpy's normalize_per_cell(1e4),
    log1p, scale(max_value=10)): per-cell total to 1e4, log1p, per-gene zero mean and unit
    variance (ddof=1, as scanpy; constant genes left at 0), clipped to [-10, 10]."""
    if hasattr(X, "toarray"):
        X = X.toarray()
    X = np.asarray(X, dtype=np.float64)
    tot = X.sum(axis=1, keepdims=True)
    tot[tot == 0] = 1.0
    X = np.log1p(X / tot * target_sum)
    mean = X.mean(axis=0)
    std = X.std(axis=0, ddof=1)
    std[std == 0] = 1.0
    X = np.clip((X - mean) / std, -max_value, max_value)
    return X.astype(np.float32)


def split_indices(n, seed=0, fractions=(0.7, 0.1)):
    """Random 70/10/20 train/val/test split of range(n) (numpy default_rng(seed))."""
    perm = np.random.default_rng(seed).permutation(n)
    n_tr = int(fractions[0] * n)
    n_va = int(fractions[1] * n)
    return perm[:n_tr], perm[n_tr:n_tr + n_va], perm[n_tr + n_va:]


def _summary(d):
    skip = {"markers", "epoch_times_s", "settings"}
    out = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in d.items() if k not in skip}
    out["markers[:10]"] = d["markers"][:10].tolist()
    out["n_markers"] = len(d["markers"])
    return out


def _main():
    import argparse

    import anndata as ad

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data",
                                                  "paul15.h5ad"))
    p.add_argument("--label", default="cell_type")
    p.add_argument("--model", default="supervised", choices=sorted(set(MODEL_NAMES) | set(_ALIASES)))
    p.add_argument("--skip-full", action="store_true", help="only the fixed-epoch run")
    args = p.parse_args()
    if not os.path.exists(args.data):
        args.data = "/work/shared/data/paul15.h5ad"

    adata = ad.read_h5ad(args.data)
    X = preprocess_counts(adata.X)
    y = adata.obs[args.label].cat.codes.to_numpy().astype(np.int64)
    tr, va, te = split_indices(len(y), seed=0)
    print(f"data {os.path.basename(args.data)}: {X.shape[0]} cells x {X.shape[1]} genes, "
          f"{len(np.unique(y))} classes; split {len(tr)}/{len(va)}/{len(te)}", flush=True)

    out = run_reference(args.model, X[tr], y[tr], X[va], y[va], fixed_epochs=3, lr=1e-3, seed=0)
    print("fixed_epochs=3, lr=1e-3:", _summary(out), flush=True)
    print("  epoch_times_s:", [round(t, 3) for t in out["epoch_times_s"]], flush=True)

    if not args.skip_full:
        out = run_reference(args.model, X[tr], y[tr], X[va], y[va], seed=0)
        print("full default (LR finder + early stopping):", _summary(out), flush=True)
        print(f"  -> epochs {out['epochs']}, s_per_epoch {out['s_per_epoch']:.3f} "
              f"(train only {out['s_per_epoch_train_only']:.3f}), lr_find_s {out['lr_find_s']:.1f}, "
              f"train_s {out['train_s']:.1f}, wall_s {out['wall_s']:.1f}, lr {out['lr']:.3g}", flush=True)
        print("  epoch_times_s:", [round(t, 3) for t in out["epoch_times_s"]], flush=True)


if __name__ == "__main__":
    _main()

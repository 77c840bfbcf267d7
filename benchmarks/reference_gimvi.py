"""Run scvi-tools' GIMVI, the reference for jaxsel's gimVI, on arrays from an .npz.

    /work/benchvenv/bin/python benchmarks/reference_gimvi.py --inputs in.npz --out out.json \
        [--epochs 200] [--batch-size 128] [--seed 0] [--seq-likelihood zinb|nb] \
        [--spatial-likelihood poisson|nb] [--kappa 5] [--n-latent 10] [--threads 2] \
        [--train-size 0.9] [--check-val-every-n-epoch 0]

The reference is run **unmodified** through its public API only (no scvi-tools code is
copied or patched): ``scvi.external.GIMVI.setup_anndata`` on each AnnData, the
``GIMVI(adata_seq, adata_sp, generative_distributions=[seq, spatial],
model_library_size=[True, False], n_latent=...)`` constructor with every other architecture
argument at its scvi-tools default, then ``model.train(max_epochs, batch_size, kappa,
train_size, accelerator="cpu")``. The only addition is a Lightning ``Callback`` passed
through ``train(callbacks=[...])`` (forwarded to the Trainer) that times each epoch.

``--inputs`` keys: ``x_seq`` float32 [n_seq, G] raw counts of the scRNA-seq reference,
``x_sp`` float32 [n_sp, G2] raw counts of the spatial data, ``genes_seq`` [G] str,
``genes_sp`` [G2] str (a subset of ``genes_seq``), ``impute`` [m] str (genes of
``genes_seq`` to report imputed values for).

Writes ``--out`` (JSON: timings ``setup_s`` / ``fit_s`` / ``epoch_s`` / ``per_epoch_s`` (median
of the epochs after the first) / ``latent_s`` / ``impute_s``, peak RSS, versions, settings,
sizes, split sizes, captured warnings) and, next to it with suffix ``.npz``:

* ``latent_seq`` [n_seq, n_latent], ``latent_sp`` [n_sp, n_latent]:
  ``get_latent_representation()`` (deterministic: the posterior means);
* ``scale`` / ``rate`` [n_sp, m]: the spatial element of ``get_imputed_values(normalized=True)``
  / ``(normalized=False)``, columns of the ``impute`` genes. With ``decode_mode=None`` the
  spatial cells are decoded with decode mode 1: the decoder output (a softmax over all G genes;
  with the default architecture the decoder is shared by both datasets) is renormalised so
  that it sums to 1 over the *spatial* genes, and ``rate = scale * total spatial counts``;
* ``scale_decode0`` [n_sp, m]: spatial element of ``get_imputed_values(normalized=True,
  decode_mode=0)``: the same decoder output normalised over all G genes (the softmax itself);
* ``history_<name>``: per-epoch float arrays of whatever ``model.history`` logged;
* ``impute_genes``, ``impute_index`` (into ``genes_seq``), and the split indices
  ``train_idx_seq`` / ``train_idx_sp`` / ``val_idx_seq`` / ``val_idx_sp``.

Notes on the reference's behaviour (scvi-tools 1.4.2): the training DataLoader zips one
loader per dataset; the one with more *training cells* sets the epoch length and the other is
``itertools.cycle``-d (so one epoch = ceil(n_train_largest / batch_size) steps, each step one
minibatch from each dataset; ``cycle`` replays the smaller loader's first-pass minibatches,
so within an epoch they repeat in the same order). scvi's Trainer defaults
``check_val_every_n_epoch`` to ``sys.maxsize``, so no validation pass runs (and no
``elbo_validation`` is logged) unless ``--check-val-every-n-epoch`` > 0 is given (default 0 =
the reference default).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import sys
import tempfile
import time
import warnings
from importlib import metadata
from pathlib import Path

import numpy as np


def _version(name):
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _parse(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--inputs", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--epochs", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--seq-likelihood", choices=["zinb", "nb", "poisson"], default="zinb")
    ap.add_argument("--spatial-likelihood", choices=["poisson", "nb", "zinb"], default="nb")
    ap.add_argument("--kappa", type=float, default=5)
    ap.add_argument("--n-latent", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--train-size", type=float, default=0.9)
    ap.add_argument("--check-val-every-n-epoch", type=int, default=0,
                    help="0 (default) keeps the reference default: no validation pass")
    return ap.parse_args(argv)


def main(argv=None):
    args = _parse(argv)
    npz_out = Path(args.out).with_suffix(".npz")
    if npz_out.resolve() == Path(args.inputs).resolve():
        raise SystemExit(f"--out {args.out} would overwrite --inputs with its arrays ({npz_out})")
    # before importing torch / scvi: quiet and bounded to the requested threads
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    os.environ.setdefault("MKL_NUM_THREADS", str(args.threads))

    import anndata
    import pandas as pd
    import torch

    torch.set_num_threads(args.threads)
    import lightning.pytorch as pl
    import scvi

    for name in ("scvi", "lightning", "lightning.pytorch", "lightning.fabric",
                 "pytorch_lightning", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    scvi.settings.verbosity = logging.ERROR
    scvi.settings.dl_num_workers = 0
    scvi.settings.seed = args.seed  # lightning seed_everything: python, numpy, torch
    log_dir = tempfile.TemporaryDirectory(prefix="gimvi_ref_")
    scvi.settings.logging_dir = log_dir.name  # keep Lightning's default_root_dir out of the cwd

    z = np.load(args.inputs, allow_pickle=True)
    x_seq = np.array(z["x_seq"], dtype=np.float32, copy=True)
    x_sp = np.array(z["x_sp"], dtype=np.float32, copy=True)
    genes_seq = np.asarray(z["genes_seq"]).astype(str)
    genes_sp = np.asarray(z["genes_sp"]).astype(str)
    impute = np.asarray(z["impute"]).astype(str)
    pos = {g: i for i, g in enumerate(genes_seq)}
    missing = [g for g in impute if g not in pos]
    if missing:
        raise SystemExit(f"impute genes not in genes_seq: {missing[:5]}")
    impute_index = np.array([pos[g] for g in impute], dtype=np.int64)

    class EpochTimer(pl.Callback):
        def __init__(self):
            self.epoch_s, self._t0 = [], None

        def on_train_epoch_start(self, trainer, pl_module):
            self._t0 = time.perf_counter()

        def on_train_epoch_end(self, trainer, pl_module):
            self.epoch_s.append(time.perf_counter() - self._t0)

    timer = EpochTimer()
    captured = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t0 = time.perf_counter()
        adata_seq = anndata.AnnData(X=x_seq, var=pd.DataFrame(index=genes_seq))
        adata_sp = anndata.AnnData(X=x_sp, var=pd.DataFrame(index=genes_sp))
        adata_seq.obs_names = [f"seq{i}" for i in range(adata_seq.n_obs)]
        adata_sp.obs_names = [f"sp{i}" for i in range(adata_sp.n_obs)]
        scvi.external.GIMVI.setup_anndata(adata_seq)
        scvi.external.GIMVI.setup_anndata(adata_sp)
        model = scvi.external.GIMVI(
            adata_seq, adata_sp,
            generative_distributions=[args.seq_likelihood, args.spatial_likelihood],
            model_library_size=[True, False],
            n_latent=args.n_latent,
        )
        setup_s = time.perf_counter() - t0

        train_kwargs = dict(max_epochs=args.epochs, batch_size=args.batch_size, kappa=args.kappa,
                            train_size=args.train_size, accelerator="cpu", devices=1,
                            enable_progress_bar=False, callbacks=[timer])
        if args.check_val_every_n_epoch > 0:
            train_kwargs["check_val_every_n_epoch"] = args.check_val_every_n_epoch
        t0 = time.perf_counter()
        model.train(**train_kwargs)
        fit_s = time.perf_counter() - t0

        t0 = time.perf_counter()
        latent_seq, latent_sp = model.get_latent_representation()
        latent_s = time.perf_counter() - t0

        t0 = time.perf_counter()
        scale = model.get_imputed_values(normalized=True)[1][:, impute_index]
        rate = model.get_imputed_values(normalized=False)[1][:, impute_index]
        decoded0 = model.get_imputed_values(normalized=True, decode_mode=0)
        scale_decode0 = decoded0[1][:, impute_index]
        impute_s = time.perf_counter() - t0
    for w in caught:
        msg = f"{w.category.__name__}: {w.message}"
        if msg not in captured:
            captured.append(msg)

    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB

    arrays = {
        "latent_seq": np.asarray(latent_seq, np.float32),
        "latent_sp": np.asarray(latent_sp, np.float32),
        "scale": np.asarray(scale, np.float32),
        "rate": np.asarray(rate, np.float32),
        "scale_decode0": np.asarray(scale_decode0, np.float32),
        "impute_genes": impute,
        "impute_index": impute_index,
        "train_idx_seq": np.asarray(model.train_indices_[0], np.int64),
        "train_idx_sp": np.asarray(model.train_indices_[1], np.int64),
        "val_idx_seq": np.asarray(model.validation_indices_[0], np.int64),
        "val_idx_sp": np.asarray(model.validation_indices_[1], np.int64),
    }
    history_keys = []
    for name, frame in (model.history or {}).items():
        try:
            values = np.asarray(frame, dtype=np.float64).reshape(-1)
        except (TypeError, ValueError):
            continue
        arrays[f"history_{name}"] = values
        history_keys.append(name)

    epoch_s = list(timer.epoch_s)
    later = epoch_s[1:] if len(epoch_s) > 1 else epoch_s
    n_train = [len(model.train_indices_[0]), len(model.train_indices_[1])]
    out = {
        "reference": "scvi.external.GIMVI (unmodified)",
        "setup_s": setup_s,
        "fit_s": fit_s,
        "epoch_s": epoch_s,
        "per_epoch_s": float(np.median(later)) if later else None,
        "min_epoch_s": float(np.min(later)) if later else None,
        "n_epochs_run": len(epoch_s),
        "latent_s": latent_s,
        "impute_s": impute_s,
        "peak_rss_mb": peak_rss_mb,
        "n_seq": int(x_seq.shape[0]), "n_genes_seq": int(x_seq.shape[1]),
        "n_sp": int(x_sp.shape[0]), "n_genes_sp": int(x_sp.shape[1]),
        "n_impute": int(len(impute)),
        "n_train": n_train,
        "n_val": [len(model.validation_indices_[0]), len(model.validation_indices_[1])],
        "steps_per_epoch": int(np.ceil(max(n_train) / args.batch_size)),
        "history_keys": history_keys,
        "settings": {
            "epochs": args.epochs, "batch_size": args.batch_size, "seed": args.seed,
            "seq_likelihood": args.seq_likelihood, "spatial_likelihood": args.spatial_likelihood,
            "kappa": args.kappa, "n_latent": args.n_latent, "threads": args.threads,
            "torch_threads": torch.get_num_threads(), "train_size": args.train_size,
            "check_val_every_n_epoch": args.check_val_every_n_epoch or None,
            "model_library_size": [True, False],
        },
        "versions": {
            "python": platform.python_version(), "torch": torch.__version__,
            "scvi-tools": _version("scvi-tools"), "lightning": _version("lightning"),
            "numpy": np.__version__, "anndata": _version("anndata"),
        },
        "warnings": captured,
        "inputs": str(Path(args.inputs).resolve()),
        "arrays": str(npz_out),
    }
    np.savez(npz_out, **arrays)
    Path(args.out).write_text(json.dumps(out, indent=1))
    log_dir.cleanup()
    print(f"fit {fit_s:.2f}s, per epoch {out['per_epoch_s']:.3f}s, peak RSS {peak_rss_mb:.0f} MB",
          file=sys.stderr)


if __name__ == "__main__":
    main()

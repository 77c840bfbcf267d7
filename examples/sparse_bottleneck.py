"""Sparse bottleneck network on real paired data from ``../shared/data`` (skips when absent).

    python examples/sparse_bottleneck.py                  # M1 Patch-seq genes -> 16 ephys features
    python examples/sparse_bottleneck.py --dataset cbmc   # CBMC CITE-seq RNA -> 13 proteins
    python examples/sparse_bottleneck.py --curves benchmarks/results/bench_sbnn.json

The paper's preprocessing (counts scaled to the median cell total, log2(x + 1), every gene
and every Y feature standardised), then the paper's whole schedule on all cells: k-means
pre-training, frozen and unfrozen regression, pruning to 25 genes, fine-tuning and the
autoencoder head that decodes the selected genes from the 2-D latent. Writes the paper's
Figure 1 panels to a PNG: the latent coloured by cell type, predicted genes and Y features
as contour maps over it, and (with ``--curves``, the JSON written by
``benchmarks/bench_sbnn.py``) the train/test R^2 curves of the 10-fold CV with the sRRR
lines. About a minute on a laptop CPU for M1 (compilation included).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

import jaxsel
from jaxsel import datasets, plotting
from jaxsel import preprocessing as pp

DATASETS = {"m1": ("m1_patchseq_sbnn", "RNA_family"), "cbmc": ("cbmc_citeseq", "cell_type")}


def load(name: str):
    short, label_key = DATASETS[name]
    adata = datasets.load_shared(short)
    x, y = pp.sbnn_recipe(adata.X, np.asarray(adata.obsm["Y"]))
    y_names = [str(v) for v in adata.uns.get("Y_names", [f"Y{i}" for i in range(y.shape[1])])]
    return x, y, np.asarray(adata.var_names).astype(str), np.asarray(adata.obs[label_key]).astype(str), y_names


def curves_from(path: str, dataset: str):
    """Per-fold R^2 curves of the schedule variants and the sRRR lines from the benchmark's JSON."""
    with open(path) as f:
        res = json.load(f).get(dataset, {})
    curves = {
        f"sBNN {name}": {"train": np.asarray(run["history_per_fold"]["train_r2"], dtype=float),
                         "test": np.asarray(run["history_per_fold"]["test_r2"], dtype=float)}
        for name, run in res.get("sbnn", {}).items()
    }
    baselines = {name: (run["test_r2"]["mean"], run["test_r2"]["sd"]) for name, run in res.get("srrr", {}).items()}
    return curves, baselines


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", choices=sorted(DATASETS), default="m1")
    ap.add_argument("--n-genes", type=int, default=25)
    ap.add_argument("--curves", help="bench_sbnn.py JSON with the CV curves and sRRR results")
    ap.add_argument("--out", help="PNG path (default sbnn_<dataset>.png)")
    ap.add_argument("--random-state", type=int, default=0)
    args = ap.parse_args(argv)
    if datasets.shared_data_dir() is None:
        print("../shared/data is not here (set JAXSEL_DATA_DIR); nothing to do.")
        return 0
    x, y, genes, labels, y_names = load(args.dataset)
    print(f"{args.dataset}: {x.shape[0]} cells x {x.shape[1]} genes -> {y.shape[1]} features")

    t0 = time.perf_counter()
    est = jaxsel.SparseBottleneck(n_genes=args.n_genes, random_state=args.random_state).fit(x, y)
    print(f"whole schedule (250 epochs + autoencoder head): {time.perf_counter() - t0:.1f} s, compile included")
    print("selected genes:", ", ".join(genes[est.genes_]))
    print(f"training R^2 after fine-tuning: {est.score(x, y):.3f}")

    z = est.latent(x)
    gene_pred = est.reconstruct_genes(x)  # columns in genes_ order
    y_pred = est.predict(x)
    r2_feat = 1 - np.sum((y - y_pred) ** 2, 0) / np.sum((y - y.mean(0)) ** 2, 0)
    best_y = np.argsort(-r2_feat)[:6]
    curves = baselines = None
    if args.curves:
        curves, baselines = curves_from(args.curves, args.dataset)
    out = args.out or f"sbnn_{args.dataset}.png"
    plotting.sbnn_figure(
        z,
        labels,
        gene_predictions={genes[g]: gene_pred[:, i] for i, g in enumerate(est.genes_[:6])},
        y_predictions={y_names[j]: y_pred[:, j] for j in best_y},
        curves=curves or None,
        baselines=baselines or None,
        stage_boundaries={"unfreeze": 50, "prune": 100} if curves else None,
        path=out,
    )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""MarkerMap on real single-cell data from ``../shared/data`` (skips when it is absent).

    python examples/real_data.py                      # Paul15 (about 30 s on a laptop CPU)
    python examples/real_data.py --dataset zeisel2015 # or cbmc_citeseq; --dataset all

The paper's preprocessing (per-cell total 1e4, log1p, per-gene scaling clipped at 10),
a 70/10/20 split, k = 50 markers chosen on the training cells with the paper's protocol
(learning-rate range test, early stopping on the validation cells), then kNN and
random-forest accuracy of those markers on the test cells, against random markers and
one-vs-rest t-test markers. Also writes the markers to ``adata.var`` with
``jaxsel.tl.markermap`` to show the AnnData interface.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

import jaxsel
from jaxsel import datasets, metrics
from jaxsel import preprocessing as pp

LABELS = {"paul15": "cell_type", "zeisel2015": "level1class", "cbmc_citeseq": "cell_type"}


def run(name: str, n_markers: int = 50, random_state: int = 0):
    x, y, genes = datasets.paper_dataset(name)
    xp, _ = pp.markermap_recipe(x)
    train, val, test = pp.split_indices(len(y), (0.7, 0.1, 0.2), random_state=random_state)
    fit_cells = np.concatenate([train, val])  # the estimator carves its own validation part
    print(f"\n{name}: {xp.shape[0]} cells x {xp.shape[1]} genes, {len(np.unique(y))} cell types")

    t0 = time.perf_counter()
    sel = jaxsel.MarkerMap(n_markers=n_markers, objective="supervised", validation_fraction=1 / 8,
                           random_state=random_state).fit(xp[fit_cells], y[fit_cells])
    print(f"MarkerMap: {time.perf_counter() - t0:.1f} s (compile included), {sel.n_epochs_} epochs, "
          f"learning rate {sel.learning_rate_:.2e} from the range test")
    print("first markers:", ", ".join(genes[i] for i in sel.markers_[:10]), "...")
    rows = {
        "MarkerMap": sel.markers_,
        "t-test": jaxsel.DEMarkers(n_markers, method="t-test").fit(xp[train], y[train]).markers_,
        "random": jaxsel.RandomMarkers(n_markers, random_state=random_state).fit(xp[train]).markers_,
    }
    print(f"{'markers':<10} {'kNN acc':>8} {'RF acc':>8} {'RF F1w':>8}")
    for label, markers in rows.items():
        knn = metrics.classification_scores(xp[train], y[train], xp[test], y[test], markers, "knn")
        rf = metrics.classification_scores(xp[train], y[train], xp[test], y[test], markers, "rf")
        print(f"{label:<10} {knn['accuracy']:>8.3f} {rf['accuracy']:>8.3f} {rf['f1_weighted']:>8.3f}")

    # The AnnData interface: writes only adata.var["markermap"], ["markermap_score"], uns["markermap"].
    adata = datasets.load_shared(name)
    adata.X = xp
    jaxsel.tl.markermap(adata, n_markers=n_markers, labels_key=LABELS[name], random_state=random_state)
    print("adata.var['markermap'].sum() =", int(adata.var["markermap"].sum()))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="paul15", choices=[*LABELS, "all"])
    args = ap.parse_args(argv)
    if datasets.shared_data_dir() is None:
        print("../shared/data not found (set JAXSEL_DATA_DIR to its path); nothing to do.")
        return 0
    for name in (LABELS if args.dataset == "all" else [args.dataset]):
        run(name)
    return 0


if __name__ == "__main__":
    sys.exit(main())

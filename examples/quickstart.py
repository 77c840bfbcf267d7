"""jaxsel quick start: pick marker genes on the embedded synthetic default data.

Runs on a laptop CPU in under a minute, no download:

    python examples/quickstart.py

The data (``jaxsel.datasets.make_markers``) has planted marker genes for five cell
types and two "XOR" genes that separate two more types only jointly. The script fits a
supervised MarkerMap, prints the chosen genes, and compares the test-set kNN accuracy of
its markers with random markers and one-vs-rest t-test markers.
"""

from __future__ import annotations

import time

import numpy as np

import jaxsel
from jaxsel import datasets, metrics
from jaxsel import preprocessing as pp


def main(n_markers: int = 20, random_state: int = 0) -> dict:
    x, y, info = datasets.make_markers(
        n_cells=2000, n_genes=200, n_types=5, n_markers_per_type=3, n_xor_genes=2, xor_fraction=0.3,
        random_state=random_state,
    )
    labels = np.asarray(info["type_names"])[y]
    xp, _ = pp.markermap_recipe(x)  # normalise to 1e4 per cell, log1p, scale per gene (clip 10)
    train, test = pp.split_indices(labels, fractions=(0.8, 0.2), random_state=random_state, stratify=True)

    t0 = time.perf_counter()
    sel = jaxsel.MarkerMap(
        n_markers=n_markers, objective="supervised", hidden_size=64, learning_rate=3e-3, patience=10, random_state=random_state
    ).fit(xp[train], labels[train])
    fit_s = time.perf_counter() - t0

    planted = set(info["marker_genes"].tolist())
    xor = set(info["xor_genes"].tolist())
    chosen = [int(g) for g in sel.markers_]
    print(f"MarkerMap fit ({sel.n_epochs_} epochs, compile included): {fit_s:.1f} s")
    print("markers:", " ".join(info["gene_names"][g] + ("*" if g in planted else "+" if g in xor else "") for g in chosen))
    print(f"  planted markers found: {len(planted & set(chosen))}/{len(planted)} (*), XOR genes found: {len(xor & set(chosen))}/{len(xor)} (+)")

    rows = {"MarkerMap": sel.markers_}
    rows["random"] = jaxsel.RandomMarkers(n_markers, random_state=random_state).fit(xp[train]).markers_
    rows["t-test"] = jaxsel.DEMarkers(n_markers, method="t-test").fit(xp[train], labels[train]).markers_
    out = {}
    print(f"\n{'markers':<10} {'kNN acc':>8} {'RF acc':>8}")
    for name, markers in rows.items():
        knn = metrics.classification_scores(xp[train], labels[train], xp[test], labels[test], markers, "knn")
        rf = metrics.classification_scores(xp[train], labels[train], xp[test], labels[test], markers, "rf")
        out[name] = (knn["accuracy"], rf["accuracy"])
        print(f"{name:<10} {knn['accuracy']:>8.3f} {rf['accuracy']:>8.3f}")
    return out


if __name__ == "__main__":
    main()

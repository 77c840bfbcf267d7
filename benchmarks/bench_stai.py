"""stAI: the spatial imputation protocol, against the released code and a kNN baseline.

    python benchmarks/bench_stai.py --stai-path /path/to/gszou99-stAI \\
        --ref-python /path/to/venv-with-torch-geometric/bin/python     # everything
    python benchmarks/bench_stai.py --only speed ...                   # side-by-side speed
    python benchmarks/bench_stai.py --only quality --datasets osmfish --gene-folds 11 --epochs 100
    python benchmarks/bench_stai.py --report benchmarks/results/bench_stai.json   # re-render

Data (``../shared/data``; skipped when absent): osmFISH (4839 cells x 33 genes) split
50/50 into a reference and a spatial part, stratified by cell type (seed 0); STARmap mPFC
(3704 x 158) with sections 0 and 1 as the reference and section 2 as the spatial part;
MERFISH hypothalamus (4975 x 155 genes after dropping the blank controls; the released
values are normalised, not counts) split like osmFISH.
Each part is normalised to 1e4 per cell and log1p'd (the spatial part over the genes it
keeps as input), then every gene is standardised within its dataset.
``--capture-sd SD`` adds the protocol's optional technology shift: every reference gene
gets a log-normal capture efficiency (:func:`jaxsel.datasets.capture_distortion`, seed 0;
counts are thinned binomially and stay counts, MERFISH's values are multiplied). The
spatial part, whose measured values are the truth, is left as measured.

Phases
------
1. ``speed``: one imputation (one held-out gene fold of osmFISH, k = 5 calibration
   submodels) at ``--speed-epochs`` epochs, side by side on the same inputs: the released
   code (``--stai-path``, run by ``--ref-python`` through ``reference_stai.py``, one
   submodel after another as it does), jaxsel with the 5 submodels vmapped in one program
   and looped (``lax.map`` one at a time); seconds per submodel-epoch, compile time
   apart, peak RSS, and the projection to the default 5 x 500 epochs.
2. ``quality``: the protocol per dataset: held-out gene folds (``--gene-folds``; default
   leave-one-gene-out for osmFISH and 10 folds for STARmap and MERFISH) x 5 calibration submodels as
   one compiled program (:meth:`jaxsel.StAI.cross_validate_genes`) at ``--epochs``;
   median PCC / RMSE / JSD of the held-out genes for jaxsel and the kNN-in-shared-PCA
   baseline on the same folds; with ``--ref-quality-folds n`` the released code also runs
   the first ``n`` held-out folds at the same epochs and the PCCs of those genes are
   compared gene for gene. gimVI (:meth:`jaxsel.GimVI.cross_validate_genes`, its own
   defaults and ``--gimvi-epochs``, ``--gimvi-seeds`` restarts; all folds x seeds one
   program) is fitted on the raw counts of the same two parts with the same held-out
   folds, and scored against the same measured values on the same cells (its imputation
   on the log-normalised scale; PCC and the z-scored RMSE do not depend on the scale).
   MERFISH's released values are not counts, so gimVI is not run on it.
3. ``annotation``: :class:`jaxsel.StAI` with ``task="annotate"`` (the authors' annotation
   configuration) on all shared genes; accuracy, macro and weighted F1 of the spatial
   part's types against the kNN baseline (majority type of the nearest reference cells)
   and gimVI with label transfer: the majority type of each spatial cell's 10 nearest
   reference cells in gimVI's joint latent space (fitted on all shared genes; gimVI has
   no classifier of its own).

Results: ``benchmarks/results/bench_stai.json`` (after every phase) and ``bench_stai.md``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from bench_gimvi import modelled_spatial_cells  # noqa: E402
from bench_scale import int_at_least  # noqa: E402
from bench_markermap import PeakRSS, machine_info, write_results  # noqa: E402
from jaxsel import GimVI, datasets, engine, metrics  # noqa: E402
from jaxsel import preprocessing as pp  # noqa: E402
from jaxsel.imputers import StAI, _gene_masks  # noqa: E402
from jaxsel.methods import baselines  # noqa: E402
from jaxsel.methods import stai as st  # noqa: E402

OUT = HERE / "results"
K = 5
# jaxsel's speed runs: (name, submodels per device at once (None: all vmapped), CPU devices)
SPEED_MODES = (("vmapped", None, 1), ("looped", 1, 1), ("sharded_2_cpu_devices", None, 2),
               ("sharded_2_cpu_devices_looped", 1, 2))


# ----------------------------------------------------------------------------- data


def load(name: str, capture_sd: float = 0.0):
    """The two parts of dataset ``name`` (raw reference and spatial values, their
    log-normalised forms, genes, spatial coordinates, labels) as a dict, or None without
    the shared data. ``capture_sd > 0`` distorts the reference's genes (a technology shift)."""
    if datasets.shared_data_dir() is None:
        return None
    if name == "osmfish":
        ad = datasets.load_shared("osmfish")
        labels = np.asarray(ad.obs["celltype"]).astype(str)
        ref, spi = datasets.reference_spatial_split(labels, spatial_fraction=0.5, random_state=0)
    elif name == "starmap":
        ad = datasets.load_shared("starmap_mpfc")
        labels = np.asarray(ad.obs["cell_type"]).astype(str)
        ref, spi = datasets.reference_spatial_split(sections=np.asarray(ad.obs["batch"]), reference_sections=["0", "1"])
    elif name == "merfish":  # normalised values, not counts (kept as released); blank controls dropped
        ad = datasets.load_shared("merfish_hypothalamus")
        ad = ad[:, ~np.asarray(ad.var["is_blank_control"], bool)]
        labels = np.asarray(ad.obs["cell_type"]).astype(str)
        ref, spi = datasets.reference_spatial_split(labels, spatial_fraction=0.5, random_state=0)
    else:
        raise ValueError(name)
    x = ad.X.toarray() if hasattr(ad.X, "toarray") else np.asarray(ad.X)
    x = x.astype(np.float32)
    coords = np.asarray(ad.obsm["spatial"], np.float64)
    counts = name != "merfish"
    x_ref = x[ref]
    if capture_sd:
        x_ref = datasets.capture_distortion(x_ref, capture_sd, random_state=0, counts=counts)[0].astype(np.float32)
    return dict(name=name, counts=counts, capture_sd=float(capture_sd), x_ref=x_ref, x_sp=x[spi],
                ref_log=pp.log_normalize(x_ref), sp_log=pp.log_normalize(x[spi]),
                genes=np.asarray(ad.var_names).astype(str), coords=coords[spi], y_ref=labels[ref], y_sp=labels[spi])


def fold_inputs(d, held, f, seed=0):
    """jaxsel's recipe for one held-out fold: the arrays the released code also gets."""
    G = d["genes"].size
    keep = np.setdiff1d(np.arange(G), held)
    classes, codes = np.unique(d["y_ref"], return_inverse=True)
    x1, x2 = pp.stai_recipe(d["x_sp"][:, keep], d["ref_log"][:, keep])
    return dict(
        x1=x1,
        x2=x2,
        coords=d["coords"],
        labels=codes,
        ref_values=d["ref_log"][:, held],
        truth=d["sp_log"][:, held],
        cal_folds=np.array(datasets.gene_folds(keep.size, K, random_state=seed + f) + [None], dtype=object)[:-1],
        seed=seed,
        n_classes=classes.size,
    )


def run_reference(args, inputs, epochs, task="impute"):
    """The released code in its own interpreter; returns its JSON plus its output (the
    imputation, or for ``task="annotate"`` the class probabilities) as ``"imputed"``."""
    with tempfile.TemporaryDirectory() as tmp:
        npz = Path(tmp) / "inputs.npz"
        np.savez(npz, **{k: v for k, v in inputs.items() if k != "n_classes"})
        out = Path(tmp) / "ref.json"
        cmd = [args.ref_python, str(HERE / "reference_stai.py"), "--stai-path", args.stai_path, "--inputs", str(npz),
               "--epochs", str(epochs), "--out", str(out), "--task", task]
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=not args.verbose)
        res = json.loads(out.read_text())
        res["wall_s"] = time.perf_counter() - t0
        res["imputed"] = np.load(out.with_suffix(".npy"))
    return res


# ----------------------------------------------------------------------------- phases


def speed_inputs(d):
    held = datasets.gene_folds(d["genes"].size, None)[0]
    return held, fold_inputs(d, held, 0)


def jaxsel_speed(inp, epochs: int, batch_size, devices: int) -> dict:
    """jaxsel's k submodels on ``inp`` (this process's devices): compile and run apart."""
    G = inp["x1"].shape[1]
    cfg = st.StAIConfig(n_genes=G, n_classes=int(inp["n_classes"]), epochs=epochs, n_inputs=G - G // K)
    data = st.StAIData(jnp.asarray(inp["x1"]), jnp.asarray(pp.spatial_knn_graph(inp["coords"], 10)),
                       jnp.asarray(inp["x2"]), jnp.asarray(inp["labels"], jnp.int32), jnp.ones(inp["n_classes"]))
    fm, cm = _gene_masks(G, list(inp["cal_folds"]))
    fm, cm = jnp.asarray(fm), jnp.asarray(cm)
    keys = jax.random.split(jax.random.key(0), K)
    mesh = engine.fold_mesh() if devices > 1 else None
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        comp = st.fit.lower(cfg, keys, data, fm, cm, batch_size=batch_size, mesh=mesh).compile()
        t_compile = time.perf_counter() - t0
        t0 = time.perf_counter()
        params, _ = comp(cfg, keys, data, fm, cm)
        jax.block_until_ready(params)
        t_run = time.perf_counter() - t0
    return dict(compile_s=t_compile, run_s=t_run, peak_rss_delta_mb=mem.delta_mb, devices=len(jax.devices()))


def _marginal(t1, t2, e1, e2, n_models):
    """Per submodel-epoch cost from two runs (fixed costs cancel) and the fixed part."""
    per = (t2 - t1) / ((e2 - e1) * n_models)
    return per, max(t1 - per * e1 * n_models, 0.0)


def speed(args, d) -> dict:
    """Both implementations at two epoch counts: the difference is the per-epoch cost
    (the released code also builds its graph, model and evaluation per submodel, a fixed
    cost that a short run would overweight); projections to 5 x 500 use both parts."""
    held, inp = speed_inputs(d)
    e1, e2 = args.speed_epochs
    out = {"held_out": [str(g) for g in d["genes"][held]], "epochs": [e1, e2], "n_spatial": int(inp["x1"].shape[0]),
           "n_ref": int(inp["x2"].shape[0]), "n_genes_in": int(inp["x1"].shape[1])}
    modes = tuple(m for m in SPEED_MODES if m[0] in args.speed_modes.split(","))
    for mode, bs, dev in modes:
        runs = []
        for e in (e1, e2):
            cmd = [sys.executable, str(Path(__file__).resolve()), "--_jaxsel-speed", json.dumps([e, bs, dev])]
            env = dict(os.environ, JAX_NUM_CPU_DEVICES=str(dev))
            res = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
            runs.append(json.loads(res.stdout.strip().splitlines()[-1]))
        per, fixed = _marginal(runs[0]["run_s"], runs[1]["run_s"], e1, e2, K)
        out[f"jaxsel_{mode}"] = dict(runs=runs, per_submodel_epoch_s=per, fixed_s=fixed,
                                    compile_s=runs[1]["compile_s"],
                                    peak_rss_delta_mb=max(r["peak_rss_delta_mb"] for r in runs),
                                    projected_5x500_s=fixed + per * K * 500)
        print(f"jaxsel {mode}: {per:.4f} s per submodel-epoch (fixed {fixed:.1f} s, compile "
              f"{runs[1]['compile_s']:.1f} s)", flush=True)
    if args.stai_path and args.ref_python:
        runs = [run_reference(args, inp, e) for e in (e1, e2)]
        for r in runs:
            r.pop("imputed")
        per, fixed = _marginal(sum(runs[0]["submodel_seconds"]), sum(runs[1]["submodel_seconds"]), e1, e2, K)
        ref = dict(runs=runs, per_submodel_epoch_s=per, fixed_s=fixed, projected_5x500_s=fixed + per * K * 500,
                   peak_rss_mb=max(r["peak_rss_mb"] for r in runs), torch=runs[0]["torch"],
                   threads=runs[0]["threads"])
        out["reference"] = ref
        for mode, _, _ in modes:
            j = out[f"jaxsel_{mode}"]
            j["speedup_per_epoch"] = per / j["per_submodel_epoch_s"]
            j["speedup_5x500"] = ref["projected_5x500_s"] / (j["projected_5x500_s"] + j["compile_s"])
        ups = ", ".join(f"{out[f'jaxsel_{m}']['speedup_per_epoch']:.1f}x {m}" for m, _, _ in modes)
        print(f"reference: {per:.3f} s per submodel-epoch (fixed {fixed:.1f} s), {ref['peak_rss_mb']:.0f} MB; "
              f"speed-up {ups}", flush=True)
    return out


def quality(args, name, d) -> dict:
    G = d["genes"].size
    n_folds = args.gene_folds if args.gene_folds else (None if name == "osmfish" else 10)
    held = datasets.gene_folds(G, n_folds, random_state=0)
    bs = args.batch_size
    bs = None if bs == "none" else (bs if bs == "auto" else int(bs))
    if args.jaxsel_results:  # the same protocol's jaxsel and kNN rows from an earlier run: the released code only
        out = _earlier_rows(args, "quality", name, gene_folds=len(held), epochs=args.epochs,
                            capture_sd=d["capture_sd"])
        _reference_subset(args, d, held, out)
        return out
    est = StAI(n_calibration_folds=K, epochs=args.epochs, batch_size=bs, random_state=0)
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        r = est.cross_validate_genes(d["x_sp"], d["x_ref"], d["y_ref"], coords=d["coords"], spatial_genes=d["genes"],
                                     ref_genes=d["genes"], gene_folds=[list(d["genes"][h]) for h in held])
        wall = time.perf_counter() - t0
    # the kNN baseline on the same folds and inputs
    knn = np.zeros_like(r.imputed)
    for f, h in enumerate(held):
        inp = fold_inputs(d, h, f)
        knn[:, h] = np.asarray(baselines.knn_pca_impute(inp["x1"], inp["x2"], inp["ref_values"],
                                                        n_components=min(30, inp["x1"].shape[1]), n_neighbors=10))
    ks = metrics.imputation_scores(r.truth, knn)
    n_models = len(held) * K
    out = {
        "n_spatial": int(d["x_sp"].shape[0]), "n_ref": int(d["x_ref"].shape[0]), "n_genes": int(G),
        "gene_folds": len(held), "epochs": args.epochs, "models": n_models, "capture_sd": d["capture_sd"],
        "jaxsel": {**r.medians(), "wall_s": wall, "per_model_epoch_s": wall / (n_models * args.epochs),
                   "peak_rss_delta_mb": mem.delta_mb, "pcc_per_gene": dict(zip(r.genes.tolist(), r.pcc.tolist()))},
        "knn": {m: float(np.nanmedian(ks[m])) for m in ("pcc", "rmse", "jsd")},
    }
    out["knn"]["pcc_per_gene"] = dict(zip(r.genes.tolist(), ks["pcc"].tolist()))
    print(f"{name}: jaxsel median PCC {out['jaxsel']['pcc']:.3f} ({wall:.0f} s), kNN {out['knn']['pcc']:.3f}",
          flush=True)
    _gimvi_quality(args, d, held, r, knn, out)
    _reference_subset(args, d, held, out)
    return out


_IMPUTATION_SCORES = ("pcc", "rmse", "jsd")


def _gimvi_quality(args, d, held, r, knn, out):
    """``out["gimvi"]``: gimVI on the same held-out folds (raw counts, ``--gimvi-epochs``,
    ``--gimvi-seeds`` restarts in one program), scored against the measured values stAI
    is scored against. Spatial cells gimVI cannot model (an empty library once a fold is
    held out) are left out of its scores, and stAI's and kNN's are given on its cells too."""
    if not args.gimvi_epochs:
        return
    if not d["counts"]:
        out["gimvi"] = {"skipped": "the released values are normalised, not counts (gimVI models counts)"}
        return
    ok = modelled_spatial_cells(d["x_sp"], held)
    ref_ok = d["x_ref"].sum(1) > 0
    est = GimVI(max_epochs=args.gimvi_epochs, random_state=0)
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        res = est.cross_validate_genes(d["x_ref"][ref_ok], d["x_sp"][ok], ref_genes=d["genes"],
                                       spatial_genes=d["genes"], gene_folds=[list(d["genes"][h]) for h in held],
                                       n_seeds=args.gimvi_seeds)
        wall = time.perf_counter() - t0
    # the same measured values (gimVI log-normalises the spatial panel itself)
    np.testing.assert_allclose(res[0].truth, r.truth[ok], rtol=1e-5, atol=1e-5)
    per_seed = [g.medians() for g in res]
    n_models = len(held) * args.gimvi_seeds
    g = {m: float(np.mean([p[m] for p in per_seed])) for m in _IMPUTATION_SCORES}
    g.update(seeds=args.gimvi_seeds, epochs=args.gimvi_epochs, models=n_models, wall_s=wall,
             per_model_epoch_s=wall / (n_models * args.gimvi_epochs), peak_rss_delta_mb=mem.delta_mb,
             pcc_sd_over_seeds=float(np.std([p["pcc"] for p in per_seed])), cells=int(ok.sum()),
             spatial_cells_left_out=int((~ok).sum()), reference_cells_left_out=int((~ref_ok).sum()),
             pcc_per_gene=dict(zip(res[0].genes.tolist(), np.mean([x.pcc for x in res], 0).tolist())))
    if not ok.all():
        for who, imp in (("jaxsel", r.imputed), ("knn", knn)):
            sc = metrics.imputation_scores(r.truth[ok], imp[ok])
            g[f"{who}_on_these_cells"] = {m: float(np.nanmedian(sc[m])) for m in _IMPUTATION_SCORES}
    out["gimvi"] = g
    print(f"{d['name']}: gimVI median PCC {g['pcc']:.3f} ({wall:.0f} s, {n_models} models, "
          f"{g['spatial_cells_left_out']} spatial cells left out)", flush=True)


def _gimvi_annotation(args, d, out):
    """``out["gimvi"]``: gimVI (all shared genes, raw counts) with label transfer, the
    majority type of each spatial cell's 10 nearest reference cells in the joint latent
    space, mean over ``--gimvi-seeds`` fits. A spatial cell with an empty library (none in
    these datasets) gets the reference's most frequent type."""
    if not args.gimvi_epochs:
        return
    if not d["counts"]:
        out["gimvi"] = {"skipped": "the released values are normalised, not counts (gimVI models counts)"}
        return
    classes, known = _scored_cells(d)
    ok, ref_ok = d["x_sp"].sum(1) > 0, d["x_ref"].sum(1) > 0
    codes = np.searchsorted(classes, d["y_ref"][ref_ok])
    onehot = np.eye(classes.size, dtype=np.float32)[codes]
    lab = _labelled(args, d["y_ref"][ref_ok])  # the neighbours that vote
    onehot, codes = onehot[lab], codes[lab]
    runs = {}
    for seed in range(args.gimvi_seeds):
        est = GimVI(max_epochs=args.gimvi_epochs, random_state=seed)
        t0 = time.perf_counter()
        est.fit(d["x_ref"][ref_ok], d["x_sp"][ok], ref_genes=d["genes"], spatial_genes=d["genes"])
        z_ref, z_sp = est.latent(modality="reference"), est.latent()
        vote = onehot[np.asarray(baselines.nearest_indices(z_sp, z_ref[lab], 10))].mean(1)
        wall = time.perf_counter() - t0
        pred = np.full(d["y_sp"].shape, classes[np.bincount(codes, minlength=classes.size).argmax()], object)
        pred[ok] = classes[vote.argmax(1)]
        runs[str(seed)] = {**metrics.annotation_scores(d["y_sp"][known], pred[known].astype(str)), "wall_s": wall}
    out["gimvi"] = {**runs["0"], "epochs": args.gimvi_epochs, "spatial_cells_without_counts": int((~ok).sum())}
    if len(runs) > 1:
        _over_seeds(out, "gimvi", runs)
    a = out.get("gimvi_seed_mean", out["gimvi"])
    print(f"{d['name']} annotation: gimVI + latent kNN acc {a['accuracy']:.3f} F1 {a['macro_f1']:.3f}", flush=True)


def _earlier_rows(args, phase: str, name: str, **expect) -> dict:
    """The ``phase`` rows of dataset ``name`` in ``--jaxsel-results``, refused unless
    they were run with the settings ``expect`` (e.g. the same gene folds and epochs)."""
    res = json.loads(Path(args.jaxsel_results).read_text())
    out = res.get(phase, {}).get(name)
    if out is None:
        raise SystemExit(f"{args.jaxsel_results} holds no {phase} results for {name}")
    got = {k: out.get(k, 0.0 if k == "capture_sd" else None) for k in expect}  # no key: run without a shift
    if got != expect:
        raise SystemExit(f"{args.jaxsel_results} holds {name} {phase} results for {got}, not {expect}")
    out["jaxsel_from"] = args.jaxsel_results
    return out


def _scored_cells(d):
    """The reference's classes and the spatial cells scored for annotation (a type the
    reference has; STARmap's unassigned "NA" cells are not scored)."""
    classes = np.unique(d["y_ref"])
    return classes, np.isin(d["y_sp"], classes) & (d["y_sp"] != "NA")


def _labelled(args, y_ref):
    """Reference cells with a cell type: all, or with ``--unlabeled L`` those not labelled
    ``L`` (e.g. STARmap's unassigned ``NA``). The others take no part in any vote, and the
    kNN baseline leaves them out of its PCA too (gimVI is still fitted on them)."""
    return np.ones(len(y_ref), bool) if args.unlabeled is None else np.asarray(y_ref) != args.unlabeled


def _cached_reference_fold(args, d, held, f, inp):
    """The released code's scores on one held-out fold, ``({"pcc", "rmse", "jsd"}, wall_s)``.
    With ``--ref-cache DIR`` each fold's scores are kept in a JSON file named after the
    dataset, fold, epochs and a digest of its genes and inputs, and reused by a later run
    of the same fold: a run of hours resumes after its last finished fold."""
    key = dict(dataset=d["name"], fold=int(f), genes=d["genes"][held].tolist(), epochs=int(args.epochs),
               inputs=engine.fingerprint(*(inp[k] for k in sorted(inp)), sorted(inp)))
    # the key's digest in the name: another protocol's fold f (other gene folds, a shift)
    # gets a file of its own instead of overwriting this one
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    path = Path(args.ref_cache) / f"{d['name']}_fold{f}_e{args.epochs}_{digest}.json" if args.ref_cache else None
    if path is not None and path.exists():
        hit = json.loads(path.read_text())
        if hit["key"] == key:
            print(f"released code, fold {f}: reusing {path}", flush=True)
            return {k: np.asarray(v, np.float64) for k, v in hit["scores"].items()}, hit["wall_s"]
    ref = run_reference(args, inp, args.epochs)
    s = metrics.imputation_scores(inp["truth"], ref["imputed"])
    scores = {k: np.asarray(s[k], np.float64) for k in ("pcc", "rmse", "jsd")}
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(dict(key=key, wall_s=ref["wall_s"], machine=machine_info(),
                                       scores={k: v.tolist() for k, v in scores.items()})))
        tmp.replace(path)
    return scores, ref["wall_s"]


def _reference_subset(args, d, held, out):
    """The released code on the first ``--ref-quality-folds`` held-out folds, scored like
    jaxsel, against jaxsel's per-gene PCC on the same genes (``out["jaxsel"]``)."""
    if not (args.ref_quality_folds and args.stai_path and args.ref_python):
        return
    genes, ref_pcc, ours = [], [], []
    t_ref = 0.0
    for f, h in enumerate(held[: args.ref_quality_folds]):
        inp = fold_inputs(d, h, f)
        s, wall = _cached_reference_fold(args, d, h, f, inp)
        t_ref += wall
        genes += d["genes"][h].tolist()
        ref_pcc += s["pcc"].tolist()
        ours += [out["jaxsel"]["pcc_per_gene"][g] for g in d["genes"][h].tolist()]
        print(f"released code, fold {f} ({', '.join(d['genes'][h])}): PCC {np.round(s['pcc'], 3).tolist()} vs "
              f"jaxsel {np.round(ours[-len(h):], 3).tolist()} ({wall:.0f} s)", flush=True)
    out["reference_subset"] = {"genes": genes, "pcc": ref_pcc, "jaxsel_pcc": ours, "wall_s": t_ref,
                               "median_pcc": float(np.nanmedian(ref_pcc)),
                               "jaxsel_median_pcc": float(np.nanmedian(ours))}


def annotation(args, name, d) -> dict:
    if args.jaxsel_results:  # the jaxsel and kNN rows of an earlier run: the released code only
        out = _earlier_rows(args, "annotation", name, epochs=args.annotation_epochs, capture_sd=d["capture_sd"],
                            unlabeled=args.unlabeled)
        _reference_annotation(args, d, out)
        return out
    # unassigned cells (STARmap's "NA") stay in the reference but are not scored
    y_eval = np.where(d["y_sp"] == "NA", "__unassigned__", d["y_sp"])
    runs = {}
    seeds = [int(v) for v in args.annotation_seeds.split(",")]
    settings = [(None, seed) for seed in seeds]
    settings += [(float(p), seeds[0]) for p in filter(None, args.class_weight_powers.split(","))]
    for power, seed in settings:
        est = StAI(n_calibration_folds=K, task="annotate", epochs=args.annotation_epochs, random_state=seed,
                   class_weight_power=power, unlabeled_category=args.unlabeled)
        t0 = time.perf_counter()
        est.fit(d["x_sp"], d["x_ref"], d["y_ref"], coords=d["coords"], spatial_genes=d["genes"],
                ref_genes=d["genes"], genes=[])
        wall = time.perf_counter() - t0
        runs[f"seed{seed}" if power is None else f"{power:g}"] = {**est.score_annotation(y_eval, unknown="ignore"),
                                                                  "wall_s": wall}
    by_seed = {seed: runs.pop(f"seed{seed}") for seed in seeds}
    ours = by_seed[seeds[0]]
    inp = fold_inputs(d, np.array([], np.int64), 0)
    onehot = np.eye(inp["n_classes"], dtype=np.float32)[inp["labels"]]
    lab = _labelled(args, d["y_ref"])
    vote = np.asarray(baselines.knn_pca_impute(inp["x1"], inp["x2"][lab], onehot[lab],
                                               n_components=min(30, inp["x1"].shape[1]), n_neighbors=10))
    classes, known = _scored_cells(d)
    knn = metrics.annotation_scores(d["y_sp"][known], classes[vote.argmax(1)][known])
    print(f"{name} annotation: jaxsel acc {ours['accuracy']:.3f} F1 {ours['macro_f1']:.3f}; "
          f"kNN acc {knn['accuracy']:.3f} F1 {knn['macro_f1']:.3f}", flush=True)
    out = {"epochs": args.annotation_epochs, "capture_sd": d["capture_sd"], "unlabeled": args.unlabeled,
           "jaxsel": ours, "knn": knn,
           "cells_scored": int(known.sum()),
           "jaxsel_class_weight_power": runs}
    if len(seeds) > 1:  # the default's spread over seeds (the class-weight rows are of the first seed)
        _over_seeds(out, "jaxsel", {str(k): v for k, v in by_seed.items()})
        mean = out["jaxsel_seed_mean"]
        print(f"{name} annotation over seeds {seeds}: jaxsel acc {mean['accuracy']:.3f} F1 {mean['macro_f1']:.3f}",
              flush=True)
    _gimvi_annotation(args, d, out)
    _reference_annotation(args, d, out)
    return out


def _reference_annotation(args, d, out):
    """With ``--ref-annotation``: the released code's annotation (its 5 submodels on all
    shared genes, the authors' configuration, ``--annotation-epochs``), scored on the same
    cells as jaxsel, once per seed of ``--ref-annotation-seeds`` (its torch seed and its
    calibration folds, as ``random_state`` does for jaxsel)."""
    if not (args.ref_annotation and args.stai_path and args.ref_python):
        return
    classes, known = _scored_cells(d)
    seeds = [int(v) for v in (args.ref_annotation_seeds or args.annotation_seeds.split(",")[0]).split(",")]
    runs = {}
    for seed in seeds:
        inp = fold_inputs(d, np.array([], np.int64), 0, seed=seed)
        inp["sp_labels"] = np.where(known, np.searchsorted(classes, d["y_sp"]), -1)
        ref = run_reference(args, inp, args.annotation_epochs, task="annotate")
        prob = np.asarray(ref["imputed"])
        if args.unlabeled is not None:  # it cannot leave them out of training: argmax among the other types
            prob = np.where(classes == args.unlabeled, -np.inf, prob)
        pred = classes[prob.argmax(1)]
        runs[str(seed)] = {**metrics.annotation_scores(d["y_sp"][known], pred[known]), "wall_s": ref["wall_s"],
                           "seconds_per_submodel_epoch": ref["seconds_per_submodel_epoch"],
                           "peak_rss_mb": ref["peak_rss_mb"], "torch": ref["torch"], "threads": ref["threads"]}
        r = runs[str(seed)]
        print(f"released code annotation, seed {seed}: acc {r['accuracy']:.3f} F1 {r['macro_f1']:.3f} "
              f"({r['wall_s']:.0f} s)", flush=True)
    out["reference"] = runs[str(seeds[0])]
    if len(seeds) > 1:
        _over_seeds(out, "reference", runs)


_ANNOTATION_SCORES = ("accuracy", "macro_f1", "weighted_f1")


def _over_seeds(out, who: str, runs: dict):
    """``out[who + "_seeds"]`` (the runs by seed) with the mean and sd of each score."""
    out[f"{who}_seeds"] = runs
    for m in _ANNOTATION_SCORES:
        v = [r[m] for r in runs.values()]
        out.setdefault(f"{who}_seed_mean", {})[m] = float(np.mean(v))
        out.setdefault(f"{who}_seed_sd", {})[m] = float(np.std(v, ddof=1))


def _seed_rows(a, who: str, label: str, first: str) -> list:
    """Table rows of an annotation result: ``first`` (the label of ``a[who]``, the first
    seed's run), the other seeds' runs and, over several seeds, mean ± sd."""
    runs = a.get(f"{who}_seeds", {})
    seed0 = f"; seed {next(iter(runs))}" if runs else ""
    rows = [(first.format(seed=seed0), a[who])]
    rows += [(f"{label}, seed {seed}" + (f" ({v['wall_s']:.0f} s)" if who == "reference" else ""), v)
             for seed, v in list(runs.items())[1:]]
    if f"{who}_seed_mean" in a:
        mean, sd = a[f"{who}_seed_mean"], a[f"{who}_seed_sd"]
        rows.append((f"{label}, mean ± sd over {len(runs)} seeds", {m: f"{mean[m]:.3f} ± {sd[m]:.3f}" for m in mean}))
    return rows


# ----------------------------------------------------------------------------- report


def _shift(phase: dict) -> str:
    sd = phase.get("capture_sd", 0.0)
    return f"; reference distorted by log-normal capture efficiencies (sd {sd:g})" if sd else ""


def render(res: dict) -> str:
    m = res.get("machine", {})
    lines = ["# stAI benchmark", "", f"Machine: {m.get('cpu')} ({m.get('cores')} cores), {m.get('platform')}; "
             f"versions {m.get('versions')}; {m.get('date')}", "", f"Command: `{res.get('command')}`", ""]
    s = res.get("speed")
    if s:
        lines += [f"## Speed: one imputation, k = 5 submodels, osmFISH split ({s['n_spatial']} spatial x "
                  f"{s['n_ref']} reference cells, {s['n_genes_in']} input genes)", "",
                  f"Each implementation ran {s['epochs'][0]} and {s['epochs'][1]} epochs; the per-epoch cost is "
                  f"the difference (fixed costs cancel), the projection adds the fixed part (and compilation).", "",
                  "| implementation | s per submodel-epoch | fixed s | compile s | peak RSS MB | projected 5 x 500 epochs "
                  "| speed-up per epoch | speed-up 5 x 500 |", "|---|---|---|---|---|---|---|---|"]
        for mode in ("vmapped", "looped", "sharded_2_cpu_devices", "sharded_2_cpu_devices_looped"):
            j = s.get(f"jaxsel_{mode}")
            if j:
                lines.append(f"| jaxsel, submodels {mode.replace('_', ' ')} | {j['per_submodel_epoch_s']:.4f} | "
                             f"{j['fixed_s']:.1f} | {j['compile_s']:.1f} | +{j['peak_rss_delta_mb']:.0f} | "
                             f"{(j['projected_5x500_s'] + j['compile_s']) / 60:.1f} min | "
                             f"{j.get('speedup_per_epoch', float('nan')):.1f}x | {j.get('speedup_5x500', float('nan')):.1f}x |")
        if "reference" in s:
            r = s["reference"]
            lines.append(f"| released stAI (torch {r['torch']}, {r['threads']} threads) | "
                         f"{r['per_submodel_epoch_s']:.3f} | {r['fixed_s']:.1f} | - | {r['peak_rss_mb']:.0f} | "
                         f"{r['projected_5x500_s'] / 3600:.2f} h | 1x | 1x |")
        lines.append("")
    for name in ("osmfish", "starmap", "merfish"):
        q = res.get("quality", {}).get(name)
        if q:
            lines += [f"## Imputation, {name}: {q['gene_folds']} held-out gene folds x 5 submodels "
                      f"({q['models']} models, one program), {q['epochs']} epochs{_shift(q)}", "",
                      "| method | median PCC | median RMSE | median JSD | wall s |", "|---|---|---|---|---|",
                      f"| jaxsel stAI | {q['jaxsel']['pcc']:.3f} | {q['jaxsel']['rmse']:.3f} | "
                      f"{q['jaxsel']['jsd']:.4f} | {q['jaxsel']['wall_s']:.0f} |",
                      f"| kNN in shared PCA | {q['knn']['pcc']:.3f} | {q['knn']['rmse']:.3f} | {q['knn']['jsd']:.4f} | |"]
            g = q.get("gimvi")
            if g and "skipped" in g:
                lines += ["", f"gimVI not run: {g['skipped']}."]
            elif g:
                lines.insert(len(lines) - 1, f"| jaxsel gimVI ({g['epochs']} epochs, {g['models']} models; mean of "
                             f"{g['seeds']} seed(s)) | {g['pcc']:.3f} | {g['rmse']:.3f} | {g['jsd']:.4f} | "
                             f"{g['wall_s']:.0f} |")
                if g["spatial_cells_left_out"]:
                    same = ", ".join(f"{w} {g[f'{w}_on_these_cells']['pcc']:.3f}" for w in ("jaxsel", "knn"))
                    lines += ["", f"gimVI leaves out {g['spatial_cells_left_out']} spatial cells with an empty "
                                  f"library in some fold; on its {g['cells']} cells the median PCCs are {same}."]
            if "reference_subset" in q:
                rs = q["reference_subset"]
                lines += ["", f"Released code on {len(rs['genes'])} of the held-out genes ({', '.join(rs['genes'])}): "
                              f"median PCC {rs['median_pcc']:.3f} vs jaxsel {rs['jaxsel_median_pcc']:.3f} on the same "
                              f"genes ({rs['wall_s']:.0f} s)."]
            lines.append("")
        a = res.get("annotation", {}).get(name)
        if a:
            unl = (f"; reference cells labelled {a['unlabeled']!r} are unlabeled (jaxsel: `unlabeled_category`; "
                   f"kNN: left out of its PCA and votes; gimVI: fitted on them, not among the voters; released code: "
                   f"trained as a type, argmax over the others)"
                   if a.get("unlabeled") else "")
            lines += [f"## Annotation, {name} ({a['epochs']} epochs, {a['cells_scored']} spatial cells){_shift(a)}{unl}",
                      "",
                      "| method | accuracy | macro F1 | weighted F1 |", "|---|---|---|---|"]
            rows = _seed_rows(a, "jaxsel", "jaxsel stAI", "jaxsel stAI (the authors' class weights 1/count^2{seed})")
            rows += [(f"jaxsel stAI, class_weight_power={p} (1/count^{p})", v)
                     for p, v in a.get("jaxsel_class_weight_power", {}).items()]
            if "reference" in a:
                rows += _seed_rows(a, "reference", "released stAI code", "released stAI code (the same "
                                   f"configuration{{seed}}; {a['reference']['wall_s']:.0f} s)")
            g = a.get("gimvi")
            if g and "skipped" not in g:
                rows += _seed_rows(a, "gimvi", "jaxsel gimVI + latent kNN",
                                   f"jaxsel gimVI + kNN label transfer in its latent ({g['epochs']} epochs{{seed}})")
            rows.append(("kNN in shared PCA", a["knn"]))
            for meth, v in rows:
                cells = [v[m] if isinstance(v[m], str) else f"{v[m]:.3f}" for m in _ANNOTATION_SCORES]
                lines.append(f"| {meth} | " + " | ".join(cells) + " |")
            lines.append("")
    return "\n".join(lines)


def save(res, out: Path):
    write_results(res, out, render)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stai-path", default=None, help="checkout of github.com/gszou99/stAI")
    ap.add_argument("--ref-python", default=None, help="interpreter with torch, torch_geometric and scanpy")
    ap.add_argument("--only", default=None, help="comma list of phases: speed,quality,annotation")
    ap.add_argument("--datasets", default="osmfish,starmap,merfish")
    ap.add_argument("--speed-epochs", type=int, nargs=2, default=[10, 30])
    ap.add_argument("--speed-modes", default=",".join(m[0] for m in SPEED_MODES),
                    help="jaxsel runs of the speed phase (comma list)")
    ap.add_argument("--epochs", type=int, default=500)
    ap.add_argument("--annotation-epochs", type=int, default=300)
    ap.add_argument("--class-weight-powers", default="",
                    help="annotation: also fit with these class_weight_power values (comma list), besides the default")
    ap.add_argument("--annotation-seeds", default="0",
                    help="annotation: random_state of the default fit (comma list; the first also for the class-weight "
                         "rows); with several, their mean and sd are reported too")
    ap.add_argument("--ref-annotation-seeds", default=None,
                    help="--ref-annotation: seeds of the released code's runs (comma list; default: the first of "
                         "--annotation-seeds)")
    ap.add_argument("--capture-sd", type=float, default=0.0,
                    help="quality and annotation: distort the reference by per-gene log-normal capture efficiencies "
                         "of this sd (a technology shift; 0: none)")
    ap.add_argument("--unlabeled", default=None, metavar="LABEL",
                    help="annotation: reference cells with this label have no cell type (STARmap's NA): jaxsel's "
                         "unlabeled_category, left out of the kNN baseline (PCA and votes) and of gimVI's votes; the released "
                         "code trains on it as a type and predicts the argmax over the others")
    ap.add_argument("--gene-folds", type=int, default=None, help="default: LOO for osmFISH, 10 for STARmap")
    ap.add_argument("--gimvi-epochs", type=int_at_least(0), default=200,
                    help="quality and annotation: also gimVI at this many epochs (its default; 0: not run)")
    ap.add_argument("--gimvi-seeds", type=int_at_least(1), default=1, help="gimVI restarts (mean over them)")
    ap.add_argument("--ref-quality-folds", type=int, default=0)
    ap.add_argument("--ref-cache", default=None,
                    help="keep the released code's per-fold scores here and reuse them (resume a long run)")
    ap.add_argument("--ref-annotation", action="store_true",
                    help="annotation: also run the released code (5 submodels x --annotation-epochs)")
    ap.add_argument("--jaxsel-results", default=None,
                    help="quality: take jaxsel's and kNN's rows of the same protocol from this earlier JSON and run "
                         "only the released code (--ref-quality-folds)")
    ap.add_argument("--batch-size", default="auto", help="models at once per device: int, none (all vmapped) or auto")
    ap.add_argument("--out", default=str(OUT / "bench_stai.json"))
    ap.add_argument("--report", default=None)
    ap.add_argument("--verbose", action="store_true")
    ap.add_argument("--_jaxsel-speed", dest="jaxsel_speed", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.jaxsel_speed:  # one timing in a fresh process (the device count is fixed at start-up)
        e, bs, dev = json.loads(args.jaxsel_speed)
        print(json.dumps(jaxsel_speed(speed_inputs(load("osmfish"))[1], e, bs, dev)))
        return
    if not args.capture_sd >= 0:  # NaN too
        ap.error(f"--capture-sd must be a non-negative number, got {args.capture_sd}")
    wants_ref = args.ref_quality_folds or args.ref_annotation
    if wants_ref and not (args.stai_path and args.ref_python):
        ap.error("--ref-quality-folds and --ref-annotation run the released code: pass --stai-path and --ref-python")
    if args.ref_cache and not args.ref_quality_folds:
        ap.error("--ref-cache keeps the released code's per-fold imputation scores: pass --ref-quality-folds")
    if args.jaxsel_results and not wants_ref:
        ap.error("--jaxsel-results reuses jaxsel's rows to run only the released code: pass --ref-quality-folds "
                 "and/or --ref-annotation")
    if args.report:
        res = json.loads(Path(args.report).read_text())
        print(render(res))
        return
    phases = set((args.only or "speed,quality,annotation").split(","))
    res = {"machine": machine_info(), "args": vars(args), "command": " ".join(["python", *sys.argv]),
           "quality": {}, "annotation": {}}
    out = Path(args.out)
    names = args.datasets.split(",")
    loaded = {n: load(n, args.capture_sd) for n in names}
    if any(v is None for v in loaded.values()):
        print("shared data not found: skipping (set JAXSEL_DATA_DIR)")
        return
    if "speed" in phases and "osmfish" in loaded:
        res["speed"] = speed(args, loaded["osmfish"])
        save(res, out)
    for n in names:
        if "quality" in phases:
            res["quality"][n] = quality(args, n, loaded[n])
            save(res, out)
        if "annotation" in phases:
            res["annotation"][n] = annotation(args, n, loaded[n])
            save(res, out)
    print(render(res))


if __name__ == "__main__":
    main()

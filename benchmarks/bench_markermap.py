"""jaxsel's MarkerMap family next to the reference package, in one run.

    python benchmarks/bench_markermap.py                 # everything (about an hour on 2 cores)
    python benchmarks/bench_markermap.py --quick         # Paul15, supervised, 1 seed, 3 folds: a smoke run
    python benchmarks/bench_markermap.py --no-reference  # jaxsel only (no torch needed)
    python benchmarks/bench_markermap.py --report benchmarks/results/markermap.json  # re-render

On the real Paul15, Zeisel (level1class) and CBMC CITE-seq data in ``../shared/data``
(skipped when absent), with k = 50, the same split (70/10/20, seed 0), the same
preprocessing (per-cell total 1e4, log1p, per-gene scale clipped at 10), architecture
(hidden 256, latent 16, the package's three-block encoder), batch size 64 and epochs:

1. speed at equal epochs: each model trained for exactly ``--epochs`` epochs at a fixed
   learning rate by both implementations; seconds per epoch, compile time separately,
   model FLOPs per step, achieved GFLOP/s against a plain jitted matmul measured in the
   same run;
2. 10 folds of supervised MarkerMap on Paul15 fitted in one vmapped program against the
   same 10 fits in a Python loop (one compiled program reused);
3. quality with the paper's whole protocol (learning-rate range test, linear mode over
   500 steps, early stopping with the paper script's patience), ``--seeds`` seeds each:
   wall time, epochs, peak memory, kNN and random-forest accuracy and weighted F1 on the
   test split; random markers as the floor;
4. ``ksweep``: accuracy against the number of markers k (``--ksweep-ks``, default
   5, 10, 25, 50, 100) for every jaxsel selector (``--ksweep-models``) and the plain
   baselines (random, Seurat HVG on the log-normalised counts, t-test and Wilcoxon DE on
   the training split), on ``--ksweep-datasets`` with ``--ksweep-seeds`` seeds; the paper's
   protocol by default (the k = 50 rows of the quality phase are reused), or
   ``--ksweep-epochs N`` fixed epochs at the paper's learning rate (a cheap form).

Results go to ``benchmarks/results/markermap.json`` (written after every fit, so a
partial run keeps what it did) and ``benchmarks/results/markermap.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import jaxsel  # noqa: E402
from jaxsel import datasets, engine, metrics  # noqa: E402
from jaxsel import preprocessing as pp  # noqa: E402
from jaxsel.methods import markermap as mm  # noqa: E402

DATASETS = {"paul15": "cell_type", "zeisel2015": "level1class", "cbmc_citeseq": "cell_type"}
MODELS = ("supervised", "unsupervised", "joint", "concrete_vae", "global_gumbel")
# The paper benchmark script's settings per model (see reference_markermap.MODEL_DEFAULTS).
SETTINGS = {
    "supervised": dict(selector="markermap", alpha=0.0, max_lr=1e-3, patience=3, temperature_decay=0.95, min_temperature=1e-4),
    "unsupervised": dict(selector="markermap", alpha=1.0, max_lr=1e-4, patience=4, temperature_decay=0.95, min_temperature=1e-4),
    "joint": dict(selector="markermap", alpha=0.5, max_lr=1e-4, patience=3, temperature_decay=0.95, min_temperature=1e-4),
    "concrete_vae": dict(selector="concrete", alpha=1.0, max_lr=1e-4, patience=3, temperature_decay=0.99, min_temperature=1e-4),
    "global_gumbel": dict(selector="global_gumbel", alpha=1.0, max_lr=1e-5, patience=10, temperature_decay=0.95, min_temperature=1e-3),
}
K, HIDDEN, LATENT, BATCH, MIN_EPOCHS, MAX_EPOCHS = 50, 256, 16, 64, 25, 100


# ----------------------------------------------------------------------------- tools


class PeakRSS:
    """Highest resident set size of this process while the block runs (sampled, 20 ms)."""

    def __init__(self):
        self.start_mb = self.peak_mb = _rss_mb()

    def _run(self):
        while not self._stop.is_set():
            self.peak_mb = max(self.peak_mb, _rss_mb())
            self._stop.wait(0.02)

    def __enter__(self):
        self.start_mb = self.peak_mb = _rss_mb()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak_mb = max(self.peak_mb, _rss_mb())

    @property
    def delta_mb(self):
        return self.peak_mb - self.start_mb


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def write_results(res: dict, out, render) -> None:
    """A benchmark's results: ``out`` (JSON; numpy scalars as floats) and, next to it,
    the markdown report ``render(res)`` with suffix ``.md``."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1, default=float))
    out.with_suffix(".md").write_text(render(res))


def machine_info() -> dict:
    cpu = "unknown"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = dict(
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        platform=platform.platform(),
        cpu=cpu,
        cores=os.cpu_count(),
        python=platform.python_version(),
        devices=[str(d) for d in jax.devices()],
        versions={"jaxsel": jaxsel.__version__, "jax": jax.__version__},
    )
    for name in ("flax", "optax", "numpy", "sklearn", "torch", "pytorch_lightning", "markermap"):
        try:
            mod = __import__(name)
            info["versions"][name] = getattr(mod, "__version__", "?")
        except Exception:  # noqa: BLE001
            pass
    try:
        from importlib.metadata import version

        info["versions"]["markermap"] = version("markermap")
    except Exception:  # noqa: BLE001
        pass
    return info


def matmul_gflops(shape=(1024, 1024, 1024), repeats=None) -> float:
    """Throughput of a plain jitted float32 matmul [m, k] @ [k, n] (the yardstick)."""
    m, k, n = shape
    a = jnp.asarray(np.random.default_rng(0).normal(size=(m, k)), jnp.float32)
    b = jnp.asarray(np.random.default_rng(1).normal(size=(k, n)), jnp.float32)
    f = jax.jit(lambda a, b: a @ b)
    f(a, b).block_until_ready()
    flops = 2.0 * m * k * n
    repeats = repeats or max(3, int(2e10 / flops))
    best = np.inf
    for _ in range(3):
        t = time.perf_counter()
        for _ in range(repeats):
            out = f(a, b)
        out.block_until_ready()
        best = min(best, (time.perf_counter() - t) / repeats)
    return flops / best / 1e9


def model_flops_per_step(cfg: mm.MarkerMapConfig, batch: int) -> dict:
    """Matmul FLOPs of one optimiser step.

    ``nominal``: the model as the authors' package runs it (f_pi output layer per cell,
    dense masked input): 2 * B * fan_in * fan_out per linear layer forward; backward
    counts 2x forward for every layer except the first layer of each input path, whose
    input is data (1x: weight gradient only).
    ``executed``: what jaxsel runs after its exact rewrites (f_pi output on the batch
    mean, masked-input backward from one shared product), same counting.
    """
    B, G, H, Z, C, L = batch, cfg.n_genes, cfg.hidden_size, cfg.latent_size, cfg.n_classes, cfg.encoder_layers
    lin = lambda i, o, n=B: 2.0 * n * i * o  # noqa: E731
    fwd_first, fwd_rest = 0.0, 0.0  # first layers of each path see data; the rest backprop input grads
    exe = 0.0
    if cfg.selector == "markermap":
        fwd_first += lin(G, H)
        fwd_rest += lin(H, H) + lin(H, G)
        exe += 2 * lin(G, H) + 3 * lin(H, H) + 2 * lin(H, G, 1)
        enc_in = G
    elif cfg.selector == "concrete":
        fwd_first += lin(G, cfg.n_markers)  # x @ W^T
        exe += 2 * lin(G, cfg.n_markers)
        enc_in = cfg.n_markers
    else:
        enc_in = G
    # encoder: the masked first layer backpropagates into the mask (2x) except for concrete
    first_enc = lin(enc_in, H)
    if cfg.selector == "concrete":
        fwd_rest += first_enc
        exe += 3 * first_enc
    elif cfg.selector == "markermap":
        fwd_rest += first_enc
        exe += 2 * first_enc  # shared-gram backward: one product for kernel and mask grads
    else:
        fwd_rest += first_enc
        exe += 2 * first_enc
    rest = (L - 1) * lin(H, H) + 2 * lin(H, Z)
    if cfg.use_recon:
        rest += 2 * (lin(Z, H) + lin(H, G))
    if cfg.use_clf:
        rest += lin(Z, H) + lin(H, C)
    fwd_rest += rest
    exe += 3 * rest
    return {"nominal": fwd_first * 2 + fwd_rest * 3, "executed": exe}


# ------------------------------------------------------------------------------ data


def load(name: str):
    x, y, _ = datasets.paper_dataset(name)
    xp, _ = pp.markermap_recipe(x)
    classes, yc = np.unique(y, return_inverse=True)
    tr, va, te = pp.split_indices(len(yc), (0.7, 0.1, 0.2), random_state=0)
    return dict(name=name, x=np.asarray(xp, np.float32), y=yc.astype(np.int32), classes=classes, tr=tr, va=va, te=te,
                counts=x)


def jax_config(model: str, d, k: int = K) -> mm.MarkerMapConfig:
    s = SETTINGS[model]
    return mm.MarkerMapConfig.create(
        d["x"].shape[1], k, alpha=s["alpha"], n_classes=len(d["classes"]), selector=s["selector"],
        hidden_size=HIDDEN, latent_size=LATENT, encoder_layers=3, temperature=3.0,
        temperature_decay=s["temperature_decay"], min_temperature=s["min_temperature"], learning_rate=s["max_lr"],
    )


SPEED_REPEATS = 3  # runs of the compiled fit in the speed phase


def jax_fit(model, d, *, seed, fixed_epochs=None, k=K):
    """One jaxsel fit; compile timed separately (ahead of time), then the run."""
    cfg = jax_config(model, d, k)
    s = SETTINGS[model]
    if fixed_epochs:
        loop = engine.LoopConfig(max_epochs=fixed_epochs, batch_size=BATCH, min_epochs=0, patience=None)
    else:
        loop = engine.LoopConfig(
            max_epochs=MAX_EPOCHS, batch_size=BATCH, min_epochs=MIN_EPOCHS, patience=s["patience"],
            lr_finder=engine.LRFinder(max_lr=s["max_lr"], mode="linear", n_steps=500),
        )
    data = mm.make_data(d["x"], d["y"] if cfg.use_clf else None)
    split = engine.make_splits([d["tr"]], [d["va"]]).fold(0)
    key = jax.random.key(seed)
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        compiled = mm.fit(cfg, loop, key, data, None, split, lower=True).compile()
        t1 = time.perf_counter()
        res = compiled(cfg, key, data, split)
        markers = np.asarray(res.markers)  # blocks
        t2 = time.perf_counter()
    n_epochs = int(res.n_epochs)
    steps = len(d["tr"]) // BATCH
    out = dict(
        impl="jaxsel", model=model, seed=seed, k=k, markers=markers.tolist(), compile_s=t1 - t0, run_s=t2 - t1,
        wall_s=t2 - t1, epochs=n_epochs, best_epoch=int(res.best_epoch), lr=float(res.learning_rate),
        steps_per_epoch=steps, peak_rss_delta_mb=mem.delta_mb, peak_rss_mb=mem.peak_mb,
    )
    if fixed_epochs:
        # The compiled fit again (same key: the same work), so that one slow run (another
        # process on the 2 cores) does not decide the figure; the median of the runs, as the
        # reference's s/epoch is the median of its epochs.
        runs = [t2 - t1]
        for _ in range(SPEED_REPEATS - 1):
            t = time.perf_counter()
            jax.block_until_ready(compiled(cfg, key, data, split).markers)
            runs.append(time.perf_counter() - t)
        out["run_s_all"] = runs
        out["s_per_epoch"] = statistics.median(runs) / n_epochs
    fl = model_flops_per_step(cfg, BATCH)
    out["flops_per_step_nominal"], out["flops_per_step_executed"] = fl["nominal"], fl["executed"]
    return out


def ref_fit(model, d, *, seed, fixed_epochs=None):
    from reference_markermap import run_reference

    s = SETTINGS[model]
    y_tr = d["y"][d["tr"]] if s["alpha"] < 1 else None
    y_va = d["y"][d["va"]] if s["alpha"] < 1 else None
    r = run_reference(
        model, d["x"][d["tr"]], y_tr, d["x"][d["va"]], y_va, k=K, hidden=HIDDEN, latent=LATENT,
        batch_size=BATCH, min_epochs=MIN_EPOCHS, max_epochs=MAX_EPOCHS, seed=seed,
        fixed_epochs=fixed_epochs, lr=s["max_lr"] if fixed_epochs else None, num_classes=len(d["classes"]),
    )
    keep = ("wall_s", "lr_find_s", "train_s", "epochs", "s_per_epoch", "min_epoch_s", "steps_per_epoch",
            "peak_rss_delta_mb", "peak_rss_mb", "lr", "other_cpu_frac", "lr_suggestion_failed")
    out = {k: r.get(k) for k in keep}
    out.update(impl="reference", model=model, seed=seed, markers=np.asarray(r["markers"]).tolist())
    return out


def evaluate(d, markers, seed=0) -> dict:
    x, y, tr, te = d["x"], d["y"], d["tr"], d["te"]
    out = {}
    for clf in ("knn", "rf"):
        s = metrics.classification_scores(x[tr], y[tr], x[te], y[te], np.asarray(markers), clf, random_state=seed)
        out[f"{clf}_acc"] = float(s["accuracy"])
        out[f"{clf}_f1w"] = float(s["f1_weighted"])
    return out


# ----------------------------------------------------------------------------- phases


def folds_phase(d, n_folds=10, seed=0) -> dict:
    """``n_folds`` folds of supervised MarkerMap in one program, vmapped and looped inside
    the program (``batch_size=1``, the estimators' CPU default), against a Python loop of
    single fits; whether each fold of either program equals its single fit bit for bit."""
    cfg = jax_config("supervised", d)
    loop = engine.LoopConfig(max_epochs=MAX_EPOCHS, batch_size=BATCH, min_epochs=MIN_EPOCHS, patience=3)
    idx = np.concatenate([d["tr"], d["va"], d["te"]])
    labels = d["y"][idx]
    folds = pp.kfold_indices(labels, n_folds, random_state=seed, stratify=True, validation_fraction=0.125)
    trains = [idx[f[0]] for f in folds]
    vals = [idx[f[1]] for f in folds]
    splits = engine.make_splits(trains, vals)
    # the single fits use the fold program's steps per epoch (the smallest fold's)
    loop = dataclasses.replace(loop, steps_per_epoch=int(np.min(np.asarray(splits.n_train))) // BATCH)
    data = mm.make_data(d["x"], d["y"])
    keys = engine.fold_keys(jax.random.key(seed), n_folds)

    t0 = time.perf_counter()
    compiled = mm.fit_folds(cfg, loop, keys, data, None, splits, mesh=None, lower=True).compile()
    t1 = time.perf_counter()
    fr = compiled(cfg, keys, data, splits)
    vm_markers = np.asarray(fr.markers)  # blocks
    t2 = time.perf_counter()

    single = mm.fit(cfg, loop, keys[0], data, None, splits.fold(0), lower=True).compile()
    t3 = time.perf_counter()
    alone = [jax.device_get(single(cfg, keys[i], data, splits.fold(i))) for i in range(n_folds)]
    t4 = time.perf_counter()
    seq = mm.fit_folds(cfg, loop, keys, data, None, splits, mesh=None, batch_size=1, lower=True).compile()
    t5 = time.perf_counter()
    fs = jax.device_get(seq(cfg, keys, data, splits))
    t6 = time.perf_counter()

    def bitwise(res, i):
        return all(np.array_equal(np.asarray(a), np.asarray(b)[i], equal_nan=True)
                   for a, b in zip(jax.tree.leaves(alone[i]), jax.tree.leaves(res)))

    fr = jax.device_get(fr)
    same = [set(a.tolist()) == set(np.asarray(b.markers).tolist()) for a, b in zip(vm_markers, alone)]
    return dict(
        n_folds=n_folds, vmapped_compile_s=t1 - t0, vmapped_run_s=t2 - t1, loop_compile_s=t3 - t2,
        loop_run_s=t4 - t3, epochs=np.asarray(fr.n_epochs).tolist(), same_markers_as_loop=same,
        vmapped_bitwise=[bitwise(fr, i) for i in range(n_folds)],
        looped_program_compile_s=t5 - t4, looped_program_run_s=t6 - t5,
        looped_program_bitwise=[bitwise(fs, i) for i in range(n_folds)],
    )


BASELINES = ("random", "hvg", "ttest", "wilcoxon")


def baseline_markers(name: str, d, k: int, seed: int) -> np.ndarray:
    """The paper's plain baselines, fitted on the training split."""
    tr = d["tr"]
    if name == "random":
        return jaxsel.RandomMarkers(k, random_state=seed).fit(d["x"][tr]).markers_
    if name == "hvg":  # Seurat flavour on log-normalised (not scaled) counts
        if "xlog" not in d:
            d["xlog"] = np.asarray(pp.log1p(pp.normalize_total(d["counts"], target_sum=1e4)), np.float32)
        return jaxsel.HVGMarkers(k).fit(d["xlog"][tr]).markers_
    method = {"ttest": "t-test", "wilcoxon": "wilcoxon"}[name]
    key = f"de_{name}"
    if key not in d:  # the round-robin order is the same for every k: score once, take prefixes
        d[key] = jaxsel.DEMarkers(max(K, k), method=method).fit(d["x"][tr], d["y"][tr])
    est = d[key]
    if est.n_markers < k:
        est = d[key] = jaxsel.DEMarkers(k, method=method).fit(d["x"][tr], d["y"][tr])
    return est.markers_[:k]


def ksweep_phase(res, data, ks, models, baselines_, seeds, epochs, save) -> None:
    """Accuracy against the number of markers; rows appended to ``res["ksweep"]``."""
    quality = {(r["data"], r["model"], r["seed"]): r for r in res.get("quality", []) if r.get("impl") == "jaxsel"}
    done = {(r["data"], r["model"], r["k"], r["seed"]) for r in res["ksweep"]}
    for name, d in data.items():
        for k in ks:
            for s in range(seeds):
                for b in baselines_:
                    if (name, b, k, s) in done or (b != "random" and s > 0):
                        continue  # hvg and DE are deterministic: one seed
                    t = time.perf_counter()
                    markers = baseline_markers(b, d, k, s)
                    row = dict(data=name, model=b, impl="baseline", k=k, seed=s, wall_s=time.perf_counter() - t,
                               **evaluate(d, markers, s))
                    res["ksweep"].append(row)
                    print(f"[ksweep] {name} {b} k={k} seed {s}: knn {row['knn_acc']:.3f} rf {row['rf_acc']:.3f}",
                          flush=True)
                for model in models:
                    if (name, model, k, s) in done:
                        continue
                    q = quality.get((name, model, s))
                    if not epochs and k == K and q is not None:  # the quality phase's fit: same protocol
                        row = {key: q.get(key) for key in ("knn_acc", "rf_acc", "knn_f1w", "rf_f1w", "wall_s",
                                                           "compile_s", "epochs")}
                        row.update(data=name, model=model, impl="jaxsel", k=k, seed=s, from_quality=True)
                    else:
                        j = jax_fit(model, d, seed=s, fixed_epochs=epochs or None, k=k)
                        row = dict(data=name, model=model, impl="jaxsel", k=k, seed=s, wall_s=j["wall_s"],
                                   compile_s=j["compile_s"], epochs=j["epochs"], **evaluate(d, j["markers"], s))
                    res["ksweep"].append(row)
                    print(f"[ksweep] {name} {model} k={k} seed {s}: knn {row['knn_acc']:.3f} rf {row['rf_acc']:.3f}",
                          flush=True)
                    save()


# ---------------------------------------------------------------------------- report


def _ms(values):
    v = [x for x in values if x is not None]
    if not v:
        return "n/a"
    if len(v) == 1:
        return f"{v[0]:.3f}"
    return f"{statistics.mean(v):.3f} ± {statistics.stdev(v):.3f}"


def render(res: dict) -> str:
    m = res["machine"]
    lines = [
        "# MarkerMap family: jaxsel vs the reference package (markermap 1.0.3)",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['platform']}; devices {m['devices']}. ",
        f"Versions: {', '.join(f'{k} {v}' for k, v in m['versions'].items())}. Date {m['date']}.",
        f"Command: `{res.get('command', '')}`",
        "",
    ]
    if res.get("resumed_from"):
        r = res["resumed_from"]
        lines += [f"Reference and random-marker rows reused from `{r['command']}` (run {r['date']}, same machine).", ""]
    lines += [
        f"Plain jitted float32 matmul on this machine: {res['matmul_gflops']['1024^3']:.1f} GFLOP/s (1024^3), "
        f"{res['matmul_gflops']['step_shape']:.1f} GFLOP/s at the step's shape (64 x genes x 256).",
        "",
    ]
    if res.get("notes"):
        lines += [f"- {n}" for n in res["notes"]] + [""]
    sp = res.get("speed", [])
    if sp:
        lines += [
            f"## Speed at equal epochs ({res['speed_epochs']} epochs, fixed learning rate, batch 64)",
            "",
            "| data | model | jaxsel s/epoch | reference s/epoch | speed-up | jaxsel compile s | steps/epoch (jaxsel / ref) "
            "| nominal GFLOP/step | jaxsel GFLOP/s (nominal) | % of matmul (1024^3) | % of matmul (step shape) "
            "| executed GFLOP/step |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for row in sp:
            j, r = row["jaxsel"], row.get("reference") or {}
            gfs = j["flops_per_step_nominal"] * j["steps_per_epoch"] / j["s_per_epoch"] / 1e9
            ratio = (r.get("s_per_epoch") or np.nan) / j["s_per_epoch"]
            lines.append(
                f"| {row['data']} | {row['model']} | {j['s_per_epoch']:.3f} | "
                f"{r.get('s_per_epoch') if r.get('s_per_epoch') is None else round(r['s_per_epoch'], 3)} | "
                f"{ratio:.2f}x | {j['compile_s']:.1f} | {j['steps_per_epoch']} / {r.get('steps_per_epoch', 'n/a')} | "
                f"{j['flops_per_step_nominal'] / 1e9:.3f} | {gfs:.1f} | {100 * gfs / res['matmul_gflops']['1024^3']:.0f}% | "
                f"{100 * gfs / res['matmul_gflops']['step_shape']:.0f}% | "
                f"{j['flops_per_step_executed'] / 1e9:.3f} |"
            )
        lines.append("")
    fo = res.get("folds")
    if fo:
        n = fo["n_folds"]

        def ident(key):
            return f"{sum(fo[key])}/{n}" if key in fo else "not measured"

        lines += [
            f"## {n} folds in one program vs {n} fits in a loop (supervised MarkerMap, Paul15)",
            "",
            "| | compile s | run s | folds bit for bit equal to their single fit |",
            "|---|---|---|---|",
            f"| one vmapped program (`batch_size=None`) | {fo['vmapped_compile_s']:.1f} | {fo['vmapped_run_s']:.1f} | "
            f"{ident('vmapped_bitwise')} (markers identical in {sum(fo['same_markers_as_loop'])}/{n}) |",
        ]
        if "looped_program_run_s" in fo:
            lines.append(f"| one program, folds looped inside (`batch_size=1`, the CPU default) | "
                         f"{fo['looped_program_compile_s']:.1f} | {fo['looped_program_run_s']:.1f} | "
                         f"{ident('looped_program_bitwise')} |")
        lines += [
            f"| loop of single fits (one compiled program reused) | {fo['loop_compile_s']:.1f} | {fo['loop_run_s']:.1f} "
            "| (the reference) |",
            "",
            f"Epochs run per fold: {fo['epochs']}.",
            "",
        ]
    q = res.get("quality", [])
    if q:
        lines += [
            "## Quality with the paper's protocol (LR range test, early stopping), k = 50, test split",
            "",
            "| data | model | impl | seeds | kNN acc | RF acc | kNN F1w | RF F1w | wall s | epochs | jaxsel compile s | peak RSS delta MB |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        groups = {}
        for row in q:
            groups.setdefault((row["data"], row["model"], row["impl"]), []).append(row)
        for (data, model, impl), rows in groups.items():
            lines.append(
                f"| {data} | {model} | {impl} | {len(rows)} | {_ms([r['knn_acc'] for r in rows])} | "
                f"{_ms([r['rf_acc'] for r in rows])} | {_ms([r['knn_f1w'] for r in rows])} | {_ms([r['rf_f1w'] for r in rows])} | "
                f"{_ms([r.get('wall_s') for r in rows])} | {_ms([r.get('epochs') for r in rows])} | "
                f"{_ms([r.get('compile_s') for r in rows]) if impl == 'jaxsel' else '-'} | {_ms([r.get('peak_rss_delta_mb') for r in rows])} |"
            )
        lines.append("")
    ksw = res.get("ksweep", [])
    if ksw:
        st = res.get("ksweep_settings", {})
        ks = sorted({r["k"] for r in ksw})
        proto = (f"{st['epochs']} fixed epochs at the paper's learning rate" if st.get("epochs")
                 else "the paper's protocol (LR range test, early stopping)")
        lines += [
            f"## Accuracy against the number of markers (kNN / RF accuracy on the test split; jaxsel selectors: {proto})",
            "",
            "| data | selector | " + " | ".join(f"k={k}" for k in ks) + " |",
            "|---|---|" + "---|" * len(ks),
        ]
        groups = {}
        for r in ksw:
            groups.setdefault((r["data"], r["model"]), {}).setdefault(r["k"], []).append(r)
        for (data, model), by_k in groups.items():
            cells = []
            for k in ks:
                rows = by_k.get(k, [])
                cells.append(f"{_ms([r['knn_acc'] for r in rows])} / {_ms([r['rf_acc'] for r in rows])}" if rows else "")
            lines.append(f"| {data} | {model} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", default=",".join(DATASETS))
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--quality-models", default=None, help="models for the quality phase (default: --models)")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=5, help="epochs of the equal-epoch speed phase")
    ap.add_argument("--no-reference", action="store_true")
    ap.add_argument("--skip", default="", help="comma list of phases to skip: speed,folds,quality,ksweep")
    ap.add_argument("--n-folds", type=int, default=10, help="folds of the vmapped-vs-loop phase")
    ap.add_argument("--ksweep-ks", default="5,10,25,50,100", help="k values of the accuracy-vs-markers phase")
    ap.add_argument("--ksweep-datasets", default="paul15", help="datasets of the k sweep (a subset of --datasets)")
    ap.add_argument("--ksweep-models", default=",".join(MODELS), help="jaxsel selectors of the k sweep")
    ap.add_argument("--ksweep-baselines", default=",".join(BASELINES), help="plain baselines of the k sweep")
    ap.add_argument("--ksweep-seeds", type=int, default=1)
    ap.add_argument("--ksweep-epochs", type=int, default=0,
                    help="0: the paper's protocol; N: N fixed epochs at the paper's learning rate (cheap)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=str(HERE / "results" / "markermap.json"))
    ap.add_argument("--report", default=None, help="only re-render the markdown of an existing JSON")
    ap.add_argument("--resume", default=None,
                    help="an earlier JSON: keep its reference (and random) rows and skipped phases, recompute jaxsel")
    args = ap.parse_args(argv)

    if args.report:
        res = json.loads(Path(args.report).read_text())
        Path(args.report).with_suffix(".md").write_text(render(res))
        print(render(res))
        return
    if args.quick:
        args.datasets, args.models, args.seeds, args.epochs, args.n_folds = "paul15", "supervised", 1, 3, 3
        args.ksweep_ks, args.ksweep_models, args.ksweep_epochs = "5,10,25,50", "supervised", 10
    if datasets.shared_data_dir() is None:
        print("SKIP: ../shared/data not found (set JAXSEL_DATA_DIR); nothing to benchmark")
        return
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    reference = not args.no_reference
    if reference:
        from reference_markermap import import_markermap

        import_markermap()  # prints that it registers the `persist` stand-in
    skip = set(filter(None, args.skip.split(",")))
    models = args.models.split(",")
    qmodels = (args.quality_models or args.models).split(",")
    res = dict(machine=machine_info(), command="python " + " ".join([sys.argv[0]] + sys.argv[1:]),
               speed_epochs=args.epochs, speed=[], quality=[], ksweep=[], notes=[])
    res["notes"].append(
        "jaxsel drops the last incomplete minibatch of an epoch (static shapes); the reference keeps it, "
        "so its epochs have one more (smaller) step."
    )
    res["notes"].append(
        f"Speed phase: jaxsel's s/epoch is the median over {SPEED_REPEATS} runs of the compiled fit (run time / "
        "epochs, validation included); the reference's is the median of its epochs (validation included)."
    )
    if reference:
        res["notes"].append(
            "markermap 1.0.3 imports `persist` (Covert's PERSIST, not on PyPI) at import time; an empty "
            "stand-in module was registered under that name. MarkerMap never calls it."
        )
    old = json.loads(Path(args.resume).read_text()) if args.resume else None
    kept = {}
    if old:
        res["notes"] += [n for n in old.get("notes", []) if n not in res["notes"]]
        for row in old.get("quality", []):
            if row.get("impl") in ("reference", "-"):
                kept[(row["data"], row["model"], row["impl"], row["seed"])] = row
        if "speed" in skip:
            res["speed"] = old.get("speed", [])
        if "folds" in skip and "folds" in old:
            res["folds"] = old["folds"]
        if "quality" in skip:
            res["quality"] = old.get("quality", [])
        if "ksweep" in skip and old.get("ksweep"):
            res["ksweep"], res["ksweep_settings"] = old["ksweep"], old.get("ksweep_settings", {})
        res["resumed_from"] = dict(file=args.resume, date=old["machine"]["date"], command=old.get("command"))
    save = lambda: out.write_text(json.dumps(res, indent=1, default=float))  # noqa: E731
    data = {name: load(name) for name in args.datasets.split(",")}
    first = next(iter(data.values()))
    res["matmul_gflops"] = {
        "1024^3": matmul_gflops(),
        "step_shape": matmul_gflops((BATCH, first["x"].shape[1], HIDDEN)),
    }
    print("matmul GFLOP/s", res["matmul_gflops"], flush=True)

    if "speed" not in skip:
        for name, d in data.items():
            for model in models:
                j = jax_fit(model, d, seed=0, fixed_epochs=args.epochs)
                r = ref_fit(model, d, seed=0, fixed_epochs=args.epochs) if reference else None
                res["speed"].append(dict(data=name, model=model, jaxsel=j, reference=r))
                print(f"[speed] {name} {model}: jaxsel {j['s_per_epoch']:.3f} s/epoch (compile {j['compile_s']:.1f} s)"
                      + (f", reference {r['s_per_epoch']:.3f} s/epoch" if r else ""), flush=True)
                save()
    if "folds" not in skip and "paul15" in data:
        res["folds"] = folds_phase(data["paul15"], n_folds=args.n_folds)
        print("[folds]", res["folds"], flush=True)
        save()
    if "quality" not in skip:
        for name, d in data.items():
            for s in range(args.seeds):
                rm = np.random.default_rng(s).choice(d["x"].shape[1], K, replace=False)
                res["quality"].append(kept.get((name, "random", "-", s))
                                      or dict(data=name, model="random", impl="-", seed=s, **evaluate(d, rm, s)))
            for model in qmodels:
                for s in range(args.seeds):
                    for impl in (["jaxsel", "reference"] if reference or kept else ["jaxsel"]):
                        if impl == "reference" and (name, model, impl, s) in kept:
                            res["quality"].append(kept[(name, model, impl, s)])
                            continue
                        if impl == "reference" and not reference:
                            continue
                        row = jax_fit(model, d, seed=s) if impl == "jaxsel" else ref_fit(model, d, seed=s)
                        row.update(evaluate(d, row["markers"], s), data=name)
                        res["quality"].append(row)
                        print(f"[quality] {name} {model} {impl} seed {s}: knn {row['knn_acc']:.3f} rf {row['rf_acc']:.3f} "
                              f"wall {row['wall_s']:.1f}s epochs {row['epochs']} lr {row['lr']:.2e}", flush=True)
                        save()
    if "ksweep" not in skip:
        kdata = {n: data[n] for n in args.ksweep_datasets.split(",") if n in data}
        ks = [int(k) for k in args.ksweep_ks.split(",") if k]
        kmodels = [m for m in args.ksweep_models.split(",") if m]
        kbase = [b for b in args.ksweep_baselines.split(",") if b]
        res["ksweep_settings"] = dict(datasets=list(kdata), ks=ks, models=kmodels, baselines=kbase,
                                      seeds=args.ksweep_seeds, epochs=args.ksweep_epochs)
        ksweep_phase(res, kdata, ks, kmodels, kbase, args.ksweep_seeds, args.ksweep_epochs, save)
    save()
    md = render(res)
    out.with_suffix(".md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()

"""Sparse bottleneck networks and sparse reduced-rank regression: the paper's 10-fold protocol.

    python benchmarks/bench_sbnn.py                  # M1 + CBMC (about an hour on 2 cores)
    python benchmarks/bench_sbnn.py --quick          # 3 folds, short schedule: a smoke run
    python benchmarks/bench_sbnn.py --skip cbmc,loop # leave phases out (or --only stability)
    python benchmarks/bench_sbnn.py --report benchmarks/results/bench_sbnn.json  # re-render

On the M1 Patch-seq data of the sBNN paper (``../shared/data``, 1213 cells x 1000 genes ->
16 ephys features; skipped when absent), with the paper's preprocessing (counts scaled to
the median total, log2(x + 1), genes and features standardised) and its folds (a
permutation with seed 42, ten contiguous test folds of ``int(n / 10)`` cells; train-set
centring inside each fold):

1. ``sbnn``: 10-fold CV of the whole schedule (50 pre-training + 200 regression epochs,
   25 genes), for the paper's schedule and the one without pre-training, all folds in one
   compiled program: compile and run time separately, test R^2 mean +- SD across folds
   (final parameters, and the authors' checkpoint: the best test epoch of fine-tuning),
   per-epoch train/test curves, genes selected in how many folds;
2. ``loop``: the same folds as a Python loop over one compiled single-fold program;
3. ``srrr``: sparse reduced-rank regression, rank 2 and rank 16, exactly 25 genes
   (lambda by bisection), relaxed; folds in one program and in a loop;
4. ``stability``: 10 random restarts on all M1 cells in one program: how often each
   gene is selected and the mean pairwise overlap of the 25-gene sets;
5. ``cbmc``: CBMC CITE-seq RNA (500 genes) -> 13 proteins, sBNN against full-rank
   (rank 13) sRRR, the paper's Figure S7 comparison (``--cbmc-folds`` of the 10 folds);
6. ``flops``: model FLOPs of one sBNN step and the achieved rate against a plain jitted
   matmul measured in the same run.

Results go to ``benchmarks/results/bench_sbnn.json`` (written after every phase) and
``bench_sbnn.md``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from bench_markermap import PeakRSS, machine_info, matmul_gflops, write_results  # noqa: E402
from jaxsel import datasets, engine  # noqa: E402
from jaxsel import preprocessing as pp  # noqa: E402
from jaxsel.methods import sbnn, srrr  # noqa: E402

OUT = HERE / "results"


# ----------------------------------------------------------------------------- data


def load(name: str):
    ad = datasets.load_shared(name)
    x, y = pp.sbnn_recipe(ad.X, np.asarray(ad.obsm["Y"]))
    return x, y, np.asarray(ad.var_names).astype(str)


def paper_folds(n: int, n_folds: int = 10, seed: int = 42):
    """The authors' folds: ``np.random.seed(seed); permutation``, contiguous test blocks
    of ``int(n / n_folds)`` cells (the last ``n % n_folds`` cells are always training)."""
    np.random.seed(seed)
    perm = np.random.permutation(n)
    size = n // n_folds
    out = []
    for i in range(n_folds):
        test = perm[i * size : (i + 1) * size]
        out.append((np.setdiff1d(np.arange(n), test), np.sort(test)))
    return out


def _stats(v) -> dict:
    v = [float(a) for a in np.asarray(v).reshape(-1)]
    return {"mean": statistics.fmean(v), "sd": statistics.pstdev(v), "values": v}


# ----------------------------------------------------------------------------- sbnn


def sbnn_setup(x, y, folds, cfg, seed=0):
    train_sets = [f[0] for f in folds]
    splits = engine.make_splits(train_sets, [f[1] for f in folds])
    # Without pre-training the program still takes (unused) cluster labels and splits.
    clusters, pre = np.zeros((len(folds), x.shape[0]), np.int32), splits
    if cfg.pretrain_epochs:
        clusters, pre_tr, pre_va = pp.pretraining_clusters(y, train_sets, n_clusters=cfg.n_clusters, random_state=seed)
        pre = engine.make_splits(pre_tr, pre_va)
    keys = engine.fold_keys(jax.random.key(seed), len(folds))
    return sbnn.make_data(x, y), splits, clusters, pre, keys


def sbnn_summary(res, genes_names, n_finetune: int) -> dict:
    h = {k: np.asarray(v) for k, v in res.history.items()}
    genes = np.asarray(res.genes)
    ids, counts = np.unique(genes, return_counts=True)
    order = np.argsort(-counts, kind="stable")
    return {
        "test_r2": _stats(h["test_r2"][:, -1]),
        "train_r2": _stats(h["train_r2"][:, -1]),
        "test_r2_best_finetune_epoch": _stats(np.nanmax(h["test_r2"][:, -n_finetune:], axis=1)),
        "test_r2_before_pruning": _stats(h["test_r2"][:, -n_finetune - 1]),
        "genes_by_folds": [[str(genes_names[ids[i]]), int(counts[i])] for i in order],
        "history": {k: np.nanmean(h[k], axis=0).tolist() for k in ("train_r2", "test_r2")},
        "history_per_fold": {k: h[k].tolist() for k in ("train_r2", "test_r2")},
    }


def sbnn_cv(x, y, folds, cfg, names, seed=0) -> dict:
    data, splits, clusters, pre, keys = sbnn_setup(x, y, folds, cfg, seed)
    t = time.perf_counter()
    lowered = sbnn.fit_folds(cfg, keys, data, splits, clusters, pre, mesh=None, lower=True)
    compiled = lowered.compile()
    t_compile = time.perf_counter() - t
    with PeakRSS() as mem:
        t = time.perf_counter()
        res = jax.block_until_ready(compiled(cfg, keys, data, clusters, splits, pre))
        t_run = time.perf_counter() - t
    out = sbnn_summary(jax.device_get(res), names, cfg.finetune_epochs)
    out.update(compile_s=t_compile, run_s=t_run, peak_rss_delta_mb=mem.delta_mb)
    return out, res


def sbnn_loop(x, y, folds, cfg, vmapped, seed=0) -> dict:
    data, splits, clusters, pre, keys = sbnn_setup(x, y, folds, cfg, seed)
    n = len(folds)
    fold_data = [sbnn.make_data(x, y, clusters[i]) for i in range(n)]
    t = time.perf_counter()
    lowered = sbnn.fit(cfg, keys[0], fold_data[0], splits.fold(0), pre.fold(0), lower=True)
    compiled = lowered.compile()
    t_compile = time.perf_counter() - t
    t = time.perf_counter()
    outs = []
    for i in range(n):
        outs.append(jax.block_until_ready(
            compiled(cfg, keys[i], fold_data[i], splits.fold(i), pre.fold(i))
        ))
    t_run = time.perf_counter() - t
    loop_r2 = np.array([np.asarray(o.history["test_r2"])[-1] for o in outs])
    vm_r2 = np.asarray(vmapped.history["test_r2"])[:, -1]
    same_genes = all(np.array_equal(np.asarray(o.genes), np.asarray(vmapped.genes)[i]) for i, o in enumerate(outs))
    return {
        "compile_s": t_compile,
        "run_s": t_run,
        "test_r2": _stats(loop_r2),
        "max_abs_diff_test_r2_vs_vmapped": float(np.max(np.abs(loop_r2 - vm_r2))),
        "same_genes_as_vmapped": bool(same_genes),
    }


def sbnn_step_flops(cfg, n_out: int, batch: int) -> float:
    """Matmul FLOPs of one training step with all layers trained, before pruning
    (forward 2mnk per layer, backward 4mnk)."""
    dims = [cfg.n_genes, *cfg.hidden, cfg.latent_size, *cfg.hidden[::-1], n_out]
    fwd = sum(2 * batch * a * b for a, b in zip(dims[:-1], dims[1:]))
    return 3.0 * fwd


def sbnn_run_flops(cfg, n_out: int, n_train: int, n_pretrain: int) -> float:
    """Matmul FLOPs of one fold's whole schedule (training steps and the per-epoch
    evaluation are not counted separately: evaluation is under 2 % here)."""
    bs = cfg.batch_size
    layer = lambda a, b: 2.0 * bs * a * b  # noqa: E731
    h = list(cfg.hidden)

    def body(n_in, n_head, trained_from):
        dims = [n_in, *h, cfg.latent_size, *h[::-1], n_head]
        pairs = list(zip(dims[:-1], dims[1:]))
        fwd = sum(layer(a, b) for a, b in pairs)
        # backward: weight grads (2mnk) for trained layers, input grads (2mnk) above them
        bwd = sum(2 * layer(a, b) if i >= trained_from else 0.0 for i, (a, b) in enumerate(pairs))
        return fwd + bwd

    steps, pre_steps = n_train // bs, n_pretrain // bs
    total = cfg.pretrain_epochs * pre_steps * body(cfg.n_genes, cfg.n_clusters, 0)
    total += cfg.frozen_epochs * steps * body(cfg.n_genes, n_out, len(h))
    total += cfg.unfrozen_epochs * steps * body(cfg.n_genes, n_out, 0)
    total += cfg.finetune_epochs * steps * body(cfg.n_selected, n_out, 0)
    return total


# ----------------------------------------------------------------------------- srrr


def srrr_cv(x, y, folds, rank, n_genes, names, relaxed=True) -> dict:
    splits = engine.make_splits([f[0] for f in folds], [f[1] for f in folds])
    xs, ys = jnp.asarray(x), jnp.asarray(y)
    kw = dict(rank=rank, n_genes=n_genes, relaxed=relaxed)
    t = time.perf_counter()
    compiled = srrr.cross_validate(xs, ys, splits, lower=True, **kw).compile()
    t_compile = time.perf_counter() - t
    t = time.perf_counter()
    res = jax.block_until_ready(compiled(xs, ys, splits))
    t_run = time.perf_counter() - t
    res = jax.device_get(res)
    genes = np.asarray(res.result.genes)
    ids, counts = np.unique(genes, return_counts=True)
    order = np.argsort(-counts, kind="stable")
    # The same folds one at a time through one compiled single-fold program.
    one = lambda i: engine.Splits(*(a[i : i + 1] for a in splits))  # noqa: E731
    t = time.perf_counter()
    single = srrr.cross_validate(xs, ys, one(0), lower=True, **kw).compile()
    t_loop_compile = time.perf_counter() - t
    t = time.perf_counter()
    loop_r2 = [float(np.asarray(jax.block_until_ready(single(xs, ys, one(i))).r2_test)[0]) for i in range(len(folds))]
    t_loop = time.perf_counter() - t
    return {
        "rank": rank,
        "relaxed": relaxed,
        "test_r2": _stats(res.r2_test),
        "train_r2": _stats(res.r2_train),
        "test_r2_mean": float(np.mean(res.r2_test)),
        "test_r2_sd": float(np.std(res.r2_test)),
        "n_nonzero_at_lambda": np.asarray(res.result.n_nonzero).tolist(),
        "compile_s": t_compile,
        "run_s": t_run,
        "loop_compile_s": t_loop_compile,
        "loop_run_s": t_loop,
        "loop_max_abs_diff_test_r2": float(np.max(np.abs(np.asarray(loop_r2) - np.asarray(res.r2_test)))),
        "genes_by_folds": [[str(names[ids[i]]), int(counts[i])] for i in order[:30]],
    }


# ----------------------------------------------------------------------------- report


def render(res: dict) -> str:
    m = res.get("machine", {})
    lines = [
        "# Sparse bottleneck network and sRRR: 10-fold CV",
        "",
        f"Machine: {m.get('cpu')} ({m.get('cores')} cores), devices {m.get('devices')}; "
        f"versions {m.get('versions')}; {m.get('date')}.",
        "",
        "| data | method | test R^2 (final) | test R^2 (best fine-tune epoch) | train R^2 | compile s | run s |",
        "|---|---|---|---|---|---|---|",
    ]
    fmt = lambda s: f"{s['mean']:.3f} +- {s['sd']:.3f}"  # noqa: E731
    for data in ("m1", "cbmc"):
        block = res.get(data, {})
        for name, r in block.get("sbnn", {}).items():
            lines.append(
                f"| {data} | sBNN {name} (folds in one program) | {fmt(r['test_r2'])} | "
                f"{fmt(r['test_r2_best_finetune_epoch'])} | {fmt(r['train_r2'])} | {r['compile_s']:.1f} | {r['run_s']:.1f} |"
            )
            if "loop" in r:
                lp = r["loop"]
                lines.append(
                    f"| {data} | sBNN {name} (Python loop over folds) | {fmt(lp['test_r2'])} | | | "
                    f"{lp['compile_s']:.1f} | {lp['run_s']:.1f} |"
                )
        for name, r in block.get("srrr", {}).items():
            lines.append(
                f"| {data} | {name}, relaxed (folds in one program) | {fmt(r['test_r2'])} | | {fmt(r['train_r2'])} | "
                f"{r['compile_s']:.1f} | {r['run_s']:.1f} |"
            )
            lines.append(
                f"| {data} | {name}, relaxed (Python loop over folds) | | | | {r['loop_compile_s']:.1f} | {r['loop_run_s']:.1f} |"
            )
    fl = res.get("flops")
    if fl:
        lines += ["", f"sBNN step: {fl['step_mflops']:.0f} MFLOP; {fl['achieved_gflops']:.1f} GFLOP/s achieved "
                  f"vs {fl['matmul_gflops']:.1f} GFLOP/s for a 1024^3 jitted matmul ({fl['fraction']:.0%})."]
    stab = res.get("m1", {}).get("stability")
    if stab:
        lines.append(
            f"\nM1 selection stability ({stab['n_restarts']} restarts on all cells, one program, "
            f"{stab['wall_s_including_compile']:.1f} s): {stab['mean_pairwise_overlap']:.1f} of 25 genes shared per "
            f"pair; {stab['n_always_selected']} genes in every restart: {', '.join(stab['always_selected'])}."
        )
    for data in ("m1",):
        for name, r in res.get(data, {}).get("sbnn", {}).items():
            top = ", ".join(f"{g} ({c})" for g, c in r["genes_by_folds"][:12])
            lines.append(f"\nM1 sBNN {name}: genes selected in most folds: {top}.")
    return "\n".join(lines) + "\n"


def save(res, out: Path):
    write_results(res, out, render)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="3 folds, 10/10/10/20 epochs")
    ap.add_argument("--skip", default="", help="comma-separated phases to skip: sbnn,straight,loop,srrr,stability,cbmc,flops")
    ap.add_argument("--only", default="", help="comma-separated phases to run (the others are skipped)")
    ap.add_argument("--cbmc-folds", type=int, default=10, help="how many of CBMC's 10 folds to fit")
    ap.add_argument("--out", default=str(OUT / "bench_sbnn.json"))
    ap.add_argument("--report", help="re-render the markdown of an existing JSON and exit")
    args = ap.parse_args(argv)
    if args.report:
        res = json.loads(Path(args.report).read_text())
        Path(args.report).with_suffix(".md").write_text(render(res))
        print(render(res))
        return 0
    if datasets.shared_data_dir() is None:
        print("../shared/data is absent (set JAXSEL_DATA_DIR); nothing to benchmark.")
        return 0
    skip = set(filter(None, args.skip.split(",")))
    if args.only:
        phases = {"sbnn", "straight", "loop", "srrr", "stability", "cbmc", "flops"}
        skip |= phases - set(args.only.split(","))
    out = Path(args.out)
    res = {"machine": machine_info(), "args": vars(args), "m1": {"sbnn": {}, "srrr": {}}, "cbmc": {"sbnn": {}, "srrr": {}}}
    quick = dict(pretrain_epochs=10, frozen_epochs=10, unfrozen_epochs=10, finetune_epochs=20) if args.quick else {}
    quick_straight = dict(pretrain_epochs=0, frozen_epochs=0, unfrozen_epochs=20, finetune_epochs=20) if args.quick else {}
    n_folds = 3 if args.quick else 10

    x, y, names = load("m1_patchseq_sbnn")
    folds = paper_folds(x.shape[0])[:n_folds]
    print(f"M1: {x.shape} -> {y.shape[1]} features, {len(folds)} folds")
    schedules = [s for s in ("pretrain_freeze", "straight") if s not in skip and "sbnn" not in skip]
    for sched in schedules:
        cfg = sbnn.SparseBottleneckConfig.create(
            x.shape[1], y.shape[1], schedule=sched, ae_epochs=0, **(quick if sched == "pretrain_freeze" else quick_straight)
        )
        r, vm = sbnn_cv(x, y, folds, cfg, names)
        print(f"sBNN {sched}: test R^2 {r['test_r2']['mean']:.3f} +- {r['test_r2']['sd']:.3f} "
              f"(best fine-tune epoch {r['test_r2_best_finetune_epoch']['mean']:.3f}); "
              f"compile {r['compile_s']:.1f} s, run {r['run_s']:.1f} s")
        if sched == "pretrain_freeze" and "loop" not in skip:
            r["loop"] = sbnn_loop(x, y, folds, cfg, vm)
            print(f"  loop: compile {r['loop']['compile_s']:.1f} s, run {r['loop']['run_s']:.1f} s, "
                  f"max |dR^2| vs vmapped {r['loop']['max_abs_diff_test_r2_vs_vmapped']:.2e}")
        res["m1"]["sbnn"][sched] = r
        save(res, out)
    if "srrr" not in skip:
        for rank in (2, 16):
            r = srrr_cv(x, y, folds, rank, 25, names)
            res["m1"]["srrr"][f"sRRR rank {rank}"] = r
            print(f"sRRR rank {rank}: test R^2 {r['test_r2']['mean']:.3f} +- {r['test_r2']['sd']:.3f}; run {r['run_s']:.1f} s")
            save(res, out)
    if "stability" not in skip:
        # The paper: 10 restarts on all cells share about 14 of 25 genes per pair, 5 genes in all 10.
        import jaxsel

        est = jaxsel.SparseBottleneck(n_genes=25, epochs={"ae": 0, **{k.split("_")[0]: v for k, v in quick.items()}},
                                      random_state=0)
        t = time.perf_counter()
        st = est.selection_stability(x, y, n_restarts=n_folds)
        el = time.perf_counter() - t
        top = np.argsort(-st["counts"], kind="stable")[:25]
        res["m1"]["stability"] = {
            "n_restarts": n_folds,
            "wall_s_including_compile": el,
            "mean_pairwise_overlap": st["mean_pairwise_overlap"],
            "n_always_selected": int(st["always_selected"].size),
            "always_selected": [str(names[i]) for i in st["always_selected"]],
            "genes_by_restarts": [[str(names[i]), int(st["counts"][i])] for i in top],
        }
        print(f"stability: {st['mean_pairwise_overlap']:.1f} of 25 genes shared per pair, "
              f"{st['always_selected'].size} in all {n_folds} restarts ({el:.1f} s)")
        save(res, out)
    if "flops" not in skip:
        cfg = sbnn.SparseBottleneckConfig.create(x.shape[1], y.shape[1])
        per_step = sbnn_step_flops(cfg, y.shape[1], cfg.batch_size)
        mm = matmul_gflops()
        r = res["m1"]["sbnn"].get("pretrain_freeze")
        fl = {"step_mflops": per_step / 1e6, "matmul_gflops": mm}
        if r:
            cfg = sbnn.SparseBottleneckConfig.create(x.shape[1], y.shape[1], ae_epochs=0, **quick)
            n_train = min(len(f[0]) for f in folds)
            n_pre = int(0.6 * 0.97 * n_train)  # about 3 % of cells sit in clusters under 10 cells
            total = sum(sbnn_run_flops(cfg, y.shape[1], n_train, n_pre) for _ in folds)
            fl.update(run_tflop=total / 1e12, achieved_gflops=total / r["run_s"] / 1e9)
            fl["fraction"] = fl["achieved_gflops"] / mm
            fl["note"] = ("model matmul FLOPs of the whole 10-fold schedule over its run time; "
                          "early-stopped pre-training epochs are counted as if run (upper bound)")
        res["flops"] = fl
        save(res, out)
    if "cbmc" not in skip:
        x, y, names = load("cbmc_citeseq")
        folds = paper_folds(x.shape[0])[: min(args.cbmc_folds, n_folds)]
        print(f"CBMC: {x.shape} -> {y.shape[1]} proteins, {len(folds)} folds")
        cfg = sbnn.SparseBottleneckConfig.create(x.shape[1], y.shape[1], ae_epochs=0, **quick)
        r, _ = sbnn_cv(x, y, folds, cfg, names)
        res["cbmc"]["sbnn"]["pretrain_freeze"] = r
        print(f"sBNN: test R^2 {r['test_r2']['mean']:.3f} +- {r['test_r2']['sd']:.3f}, run {r['run_s']:.1f} s")
        save(res, out)
        r = srrr_cv(x, y, folds, y.shape[1], 25, names)
        res["cbmc"]["srrr"][f"sRRR rank {y.shape[1]}"] = r
        print(f"sRRR full rank: test R^2 {r['test_r2']['mean']:.3f} +- {r['test_r2']['sd']:.3f}")
        save(res, out)
    print(render(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())

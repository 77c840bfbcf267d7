"""One benchmark report: run every benchmark, collect their JSONs, write a report with figures.

    python benchmarks/report.py --quick            # reduced settings, about 25 min on 2 cores
    python benchmarks/report.py                    # = --full: the published protocols (hours)
    python benchmarks/report.py --reuse            # re-render from the JSONs already there
    python benchmarks/report.py --quick --only markermap,gimvi   # run some, reuse the others
    python benchmarks/report.py --quick --dry-run  # print the commands and the estimate

The references need their own interpreter (torch, markermap, scvi-tools, torch_geometric;
see benchmarks/README.md). ``--ref-python`` names it; by default the current interpreter
is used when it can import them. The released stAI code is a checkout (``--stai-path``
or ``$STAI_PATH``). A reference that is not available is reported as such; the jaxsel
side still runs.

Benchmarks, each a subprocess (a failure is recorded with its stderr tail and does not
stop the others):

- ``markermap``: ``bench_markermap.py`` (speed at equal epochs, fold-parallel vs looped,
  quality with the paper's protocol against markermap 1.0.3, accuracy vs number of
  markers for every selector and the plain baselines);
- ``sbnn``: ``bench_sbnn.py`` (sBNN and sRRR 10-fold CV on M1 Patch-seq and CBMC, folds
  in one program vs a loop; no runnable reference, compared with the paper's numbers);
- ``stai``: ``bench_stai.py`` (side-by-side speed against the released stAI code,
  imputation and annotation quality against a kNN baseline);
- ``gimvi``: ``bench_gimvi.py`` (side-by-side speed and the held-out gene protocol
  against scvi-tools' GIMVI);
- ``scale``: ``bench_scale.py`` (one streamed epoch of MarkerMap and gimVI, and the one-pass fits, against the
  number of cells).

The per-benchmark JSONs go to ``benchmarks/results/`` (``--full``) or
``benchmarks/results/quick/`` (``--quick``), so a quick run never overwrites a full
one. The report goes to ``benchmarks/results/report.json`` and ``report.md``, with
the figures ``report_accuracy_vs_markers.png``, ``report_time_per_method.png`` and
``report_cost_vs_cells.png`` next to them.
"""

from __future__ import annotations

import argparse
import datetime
import glob
import json
import math
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path

from bench_scale import cell_count  # benchmarks/ is the script's folder, on sys.path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results"

ORDER = ("markermap", "sbnn", "stai", "gimvi", "scale")
TITLES = {
    "markermap": "MarkerMap family against markermap 1.0.3 (`bench_markermap.py`)",
    "sbnn": "Sparse bottleneck network and sRRR (`bench_sbnn.py`)",
    "stai": "stAI against the released code (`bench_stai.py`)",
    "gimvi": "gimVI against scvi-tools GIMVI (`bench_gimvi.py`)",
    "scale": "Cost against the number of cells (`bench_scale.py`)",
}
SCRIPTS = {"markermap": "bench_markermap.py", "sbnn": "bench_sbnn.py", "stai": "bench_stai.py",
           "gimvi": "bench_gimvi.py", "scale": "bench_scale.py"}
# output JSON; extra files merged in (only to fill keys the main one lacks) when a
# benchmark is reused rather than run: earlier runs split some benchmarks by phase.
FILES = {"markermap": "markermap.json", "sbnn": "bench_sbnn.json", "stai": "bench_stai.json",
         "gimvi": "bench_gimvi.json", "scale": "bench_scale.json"}
EXTRA = {"sbnn": "bench_sbnn_*.json", "stai": "bench_stai_*.json"}
# Wall-time estimates in minutes on the 2-core AMD EPYC dev machine, idle, references on.
ESTIMATE_MIN = {
    "quick": {"markermap": 12, "sbnn": 2, "stai": 4, "gimvi": 3, "scale": 2},
    "full": {"markermap": 140, "sbnn": 20, "stai": 300, "gimvi": 75, "scale": 40},
}
MM_MODELS = {"supervised": "MarkerMap supervised", "unsupervised": "MarkerMap unsupervised",
             "joint": "MarkerMap joint", "concrete_vae": "Concrete VAE",
             "global_gumbel": "Global-Gumbel VAE (global gate)"}


def _estimate(preset: str, name: str, args) -> float:
    """Minutes :data:`ESTIMATE_MIN` gives ``name``; the scale benchmark's grows with the
    cells of ``--scale-sizes`` (the full preset's 40 min are for 10k + 100k + 1M)."""
    if name == "scale" and getattr(args, "scale_sizes", None):
        return max(2.0, 40.0 * sum(args.scale_sizes) / 1_110_000)
    return float(ESTIMATE_MIN[preset][name])
BASELINE_NAMES = {"random": "random", "hvg": "HVG (Seurat)", "ttest": "DE t-test", "wilcoxon": "DE Wilcoxon"}


# ----------------------------------------------------------------------------- environment


def _probe(python: str, code: str, timeout: float = 300) -> dict | None:
    """Run ``code`` (prints one JSON line) in ``python``; None when it fails."""
    try:
        p = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=timeout, cwd=REPO)
        return json.loads(p.stdout.strip().splitlines()[-1]) if p.returncode == 0 else None
    except Exception:  # noqa: BLE001
        return None


_VERSIONS = """
import json, platform, importlib.util, importlib.metadata as md
out = {"python": platform.python_version(), "executable": __import__("sys").executable, "versions": {}, "has": {}}
for n in %r:
    try:
        out["versions"][n] = md.version(n)
    except Exception:
        pass
for m in %r:
    out["has"][m] = importlib.util.find_spec(m) is not None
if %r:
    import jax
    out["jax_devices"] = [str(d) for d in jax.devices()]
    out["jax_backend"] = jax.default_backend()
print(json.dumps(out))
"""
JAX_PKGS = ["jaxsel", "jax", "jaxlib", "flax", "optax", "numpy", "scipy", "scikit-learn", "anndata", "matplotlib"]
REF_PKGS = ["torch", "markermap", "pytorch-lightning", "lightning", "scvi-tools", "torch_geometric", "scanpy"]
REF_MODULES = ["jaxsel", "torch", "markermap", "scvi", "torch_geometric", "scanpy"]


def probe_python(python: str, with_jax: bool) -> dict | None:
    return _probe(python, _VERSIONS % (JAX_PKGS + REF_PKGS, REF_MODULES, with_jax))


def machine() -> dict:
    cpu, mem_gb = platform.processor() or "unknown", None
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal"):
                mem_gb = int(line.split()[1]) / 2**20
                break
    except OSError:
        pass
    gpu = "none"
    if shutil.which("nvidia-smi"):
        try:
            q = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                               capture_output=True, text=True, timeout=30)
            gpu = "; ".join(ln.strip() for ln in q.stdout.splitlines() if ln.strip()) or "none"
        except Exception:  # noqa: BLE001
            pass
    return {"cpu": cpu, "cores": os.cpu_count(), "ram_gb": round(mem_gb, 1) if mem_gb else None, "gpu": gpu,
            "platform": platform.platform(), "hostname": platform.node(), "loadavg": _loadavg()}


def _loadavg():
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def git_info() -> dict:
    def g(*a):
        try:
            return subprocess.run(["git", *a], capture_output=True, text=True, cwd=REPO, timeout=30).stdout.strip()
        except Exception:  # noqa: BLE001
            return ""

    status = g("status", "--porcelain")
    return {"commit": g("rev-parse", "HEAD"), "short": g("rev-parse", "--short", "HEAD"),
            "subject": g("log", "-1", "--format=%s")[:120],
            "dirty_files": len([ln for ln in status.splitlines() if ln.strip()])}


class Refs:
    """Which reference implementation can run, with which interpreter, and why not."""

    def __init__(self, args):
        self.python = args.python
        self.ref_python = args.ref_python or sys.executable
        info = probe_python(self.ref_python, with_jax=False)
        self.ref_info = info
        has = (info or {}).get("has", {})
        hint = "" if args.ref_python else " (pass --ref-python <venv with the bench extra>/bin/python)"
        where = f"`{self.ref_python}`"

        def status(mods, what):
            if info is None:
                return dict(available=False, reason=f"{where} could not be run{hint}")
            missing = [m for m in mods if not has.get(m)]
            if missing:
                return dict(available=False, reason=f"{where} cannot import {', '.join(missing)}{hint}")
            return dict(available=True, python=self.ref_python, what=what)

        self.status = {
            "markermap": status(["jaxsel", "torch", "markermap"], "markermap 1.0.3 (PyTorch Lightning)"),
            "gimvi": status(["scvi", "torch"], "scvi-tools GIMVI"),
            "stai": status(["torch", "torch_geometric", "scanpy"], "the released stAI code"),
            "sbnn": dict(available=False, reason="the authors' code is Keras / TensorFlow 1.13 notebooks; "
                         "compared with the paper's numbers instead"),
            "scale": dict(available=False, reason="no reference: jaxsel only (streaming from disk)"),
        }
        stai_path = args.stai_path or os.environ.get("STAI_PATH")
        self.stai_path = stai_path
        if self.status["stai"]["available"]:
            if not stai_path:
                self.status["stai"] = dict(available=False, reason="no checkout of github.com/gszou99/stAI "
                                           "(pass --stai-path or set STAI_PATH)")
            elif not (Path(stai_path) / "stAI" / "main.py").exists():
                self.status["stai"] = dict(available=False, reason=f"--stai-path {stai_path} has no stAI/main.py")

    def ok(self, name):
        return self.status[name]["available"]


# ----------------------------------------------------------------------------- presets


def commands(preset: str, refs: Refs, results: Path, args) -> dict:
    """``{bench: (python, argv)}`` for the preset."""
    out = {}
    q = preset == "quick"
    # MarkerMap: jaxsel and the reference in one process (needs both in one interpreter)
    mm = ["--out", str(results / FILES["markermap"])]
    if q:
        mm += ["--datasets", "paul15", "--seeds", "1", "--epochs", "3", "--n-folds", "3", "--ksweep-ks", "5,10,25,50",
               "--ksweep-datasets", "paul15", "--ksweep-seeds", "1", "--ksweep-epochs", "10"]
    else:
        mm += ["--ksweep-ks", "5,10,25,50,100", "--ksweep-datasets", "paul15,zeisel2015,cbmc_citeseq",
               "--ksweep-seeds", "3"]
    if refs.ok("markermap"):
        out["markermap"] = (refs.ref_python, mm)
    else:
        out["markermap"] = (refs.python, mm + ["--no-reference"])
    # quick: M1 only (3 folds, short schedule); CBMC's 8617 cells are for the full run
    sb = ["--out", str(results / FILES["sbnn"])] + (["--quick", "--skip", "cbmc"] if q else [])
    out["sbnn"] = (refs.python, sb)
    st = ["--out", str(results / FILES["stai"])]
    if q:
        # no annotation: it needs the authors' 300 epochs to mean anything (30 give 1 % accuracy)
        st += ["--only", "speed,quality", "--datasets", "osmfish", "--speed-epochs", "2", "6",
               "--speed-modes", "vmapped,looped", "--epochs", "30", "--gene-folds", "3"]
    else:
        st += ["--datasets", "osmfish,starmap,merfish"]
        if refs.ok("stai"):
            st += ["--ref-quality-folds", "1"]
    if refs.ok("stai"):
        st += ["--ref-python", refs.ref_python, "--stai-path", str(refs.stai_path)]
    out["stai"] = (refs.python, st)
    gv = ["--out", str(results / FILES["gimvi"])]
    if q:
        gv += ["--datasets", "osmfish", "--speed-epochs", "2", "12", "--epochs", "20", "--seeds", "1",
               "--gene-folds", "3"]
    else:
        gv += ["--datasets", "osmfish,starmap", "--speed-epochs", "2", "22", "--epochs", "200", "--seeds", "3"]
    if refs.ok("gimvi"):
        gv += ["--ref-python", refs.ref_python]
    out["gimvi"] = (refs.python, gv)
    sc = ["--out", str(results / FILES["scale"]), "--epochs", "2"]
    sizes = args.scale_sizes or ([10000, 30000] if q else [10000, 100000, 1000000])
    sc += ["--sizes", *map(str, sizes)]
    if args.scale_data_dir:
        sc += ["--data-dir", args.scale_data_dir]
    out["scale"] = (refs.python, sc)
    return out


# ----------------------------------------------------------------------------- running


def run_bench(name: str, python: str, argv: list, log_dir: Path, timeout_s: float | None, env: dict) -> dict:
    """Run one benchmark script; stream its output (prefixed) to the console and a log."""
    cmd = [python, str(HERE / SCRIPTS[name]), *argv]
    log_dir.mkdir(parents=True, exist_ok=True)
    log = log_dir / f"{name}.log"
    err_tail = deque(maxlen=60)
    out_tail = deque(maxlen=30)
    t0 = time.perf_counter()
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    load_before = _loadavg()
    print(f"\n=== {name}: {' '.join(cmd)}", flush=True)
    with open(log, "w") as fh:
        fh.write("$ " + " ".join(cmd) + "\n")
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=env, start_new_session=True, bufsize=1)
        lock = threading.Lock()

        def pump(stream, tail, tag):
            for line in stream:
                with lock:
                    fh.write(f"{tag}{line}")
                    fh.flush()
                tail.append(line.rstrip("\n"))
                print(f"  [{name}] {line}", end="", flush=True)

        threads = [threading.Thread(target=pump, args=(proc.stdout, out_tail, ""), daemon=True),
                   threading.Thread(target=pump, args=(proc.stderr, err_tail, "! "), daemon=True)]
        for t in threads:
            t.start()
        timed_out = False
        try:
            rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
            _stop(proc)
            rc = proc.returncode
        except BaseException:  # Ctrl-C or SIGTERM of the report: do not leave the benchmark running
            _stop(proc)
            raise
        for t in threads:
            t.join(timeout=10)
    wall = time.perf_counter() - t0
    status = "ok" if rc == 0 and not timed_out else ("timeout" if timed_out else "failed")
    print(f"=== {name}: {status} (exit {rc}) in {wall / 60:.1f} min", flush=True)
    return {"status": status, "returncode": rc, "wall_s": wall, "command": " ".join(cmd), "python": python,
            "argv": argv, "started": started, "log": str(log), "stderr_tail": "\n".join(err_tail),
            "stdout_tail": "\n".join(out_tail), "loadavg_before": load_before, "loadavg_after": _loadavg(),
            "timeout_s": timeout_s}


def _stop(proc) -> None:
    """End a benchmark and its children: its own process group (``start_new_session``)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=30)
            return
        except subprocess.TimeoutExpired:
            continue


def _merge_missing(dst: dict, src: dict) -> None:
    """Fill keys of ``dst`` that are missing or empty from ``src`` (recursively)."""
    for k, v in src.items():
        if k not in dst or dst[k] in (None, {}, []):
            dst[k] = v
        elif isinstance(dst[k], dict) and isinstance(v, dict):
            _merge_missing(dst[k], v)


def load_results(name: str, results: Path, fill_from_extra: bool, newer_than: float | None) -> tuple:
    """``(merged JSON or None, [source file infos])``."""
    main = results / FILES[name]
    paths = [main] if main.exists() else []
    if fill_from_extra and name in EXTRA:
        paths += sorted(p for p in map(Path, glob.glob(str(results / EXTRA[name]))) if p != main
                        and not p.name.endswith(".prev.json"))
    merged, sources = None, []
    for p in paths:
        if newer_than is not None and p.stat().st_mtime < newer_than:
            continue  # a file this run did not write
        try:
            data = json.loads(p.read_text())
        except Exception as e:  # noqa: BLE001
            sources.append({"file": str(p), "error": f"unreadable: {e}"})
            continue
        m = data.get("machine", {})
        sources.append({"file": str(p), "date": m.get("date") or data.get("date"),
                        "command": data.get("command") or _args_command(name, data.get("args")),
                        "md": str(p.with_suffix(".md")) if p.with_suffix(".md").exists() else None})
        if merged is None:
            merged = data
        else:
            _merge_missing(merged, data)
    return merged, sources


RUN_KEYS = ("status", "returncode", "wall_s", "command", "python", "argv", "started", "log", "stderr_tail",
            "stdout_tail", "loadavg_before", "loadavg_after", "timeout_s")


def _previous_run(prev: dict) -> dict | None:
    if prev.get("ran"):
        return {k: prev.get(k) for k in ("command", "started", "wall_s", "preset")}
    return prev.get("previous_run")


def _same_sources(a, b) -> bool:
    key = lambda srcs: sorted((x.get("file"), x.get("date")) for x in srcs or [])  # noqa: E731
    return bool(a) and key(a) == key(b)


def _args_command(name, a):
    if not a:
        return None
    parts = []
    for k, v in a.items():
        if v in (None, False, "", 0) or k in ("out", "report"):
            continue
        flag = "--" + k.replace("_", "-")
        parts.append(flag if v is True else f"{flag} {' '.join(map(str, v)) if isinstance(v, list) else v}")
    return f"python benchmarks/{SCRIPTS[name]} " + " ".join(parts) + "  (from its recorded arguments)"


def reference_in_results(name: str, r: dict | None) -> bool:
    """Whether a benchmark's results hold reference numbers (whatever this run could import)."""
    if not r:
        return False
    if name == "markermap":
        return any(s.get("reference") for s in r.get("speed", []) or []) or any(
            q.get("impl") == "reference" for q in r.get("quality", []) or [])
    if name == "stai":
        return "reference" in (r.get("speed") or {}) or any(
            "reference_subset" in q for q in (r.get("quality") or {}).values())
    if name == "gimvi":
        return "reference" in (r.get("speed") or {}) or any("scvi" in q for q in (r.get("quality") or {}).values())
    return False


# ----------------------------------------------------------------------------- summary


def _mean(v):
    v = [x for x in v if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return statistics.fmean(v) if v else None


def _x(v, digits=1):
    return "n/a" if v is None else f"{v:.{digits}f}x"


def _gmean(v):
    v = [x for x in v if x is not None and x > 0 and not math.isnan(x)]
    return math.exp(statistics.fmean(math.log(x) for x in v)) if v else None


def _range(vals, what):
    """Geometric mean of ratios and their range (the figure's bars are geometric means too)."""
    vals = [v for v in vals if v is not None]
    if not vals:
        return None, ""
    extra = f" ({min(vals):.1f} to {max(vals):.1f}x over {len(vals)} {what})" if len(vals) > 1 else ""
    return _gmean(vals), extra


def summary_markermap(r: dict, ref_ok: bool) -> list:
    rows = []
    speed = r.get("speed", []) or []
    quality = r.get("quality", []) or []
    datasets_ = sorted({q["data"] for q in quality} | {s["data"] for s in speed})
    seeds = sorted({q["seed"] for q in quality if q.get("impl") == "jaxsel"})
    fo = r.get("folds")
    for model, label in MM_MODELS.items():
        sp = [s for s in speed if s["model"] == model]
        per_epoch = [(s.get("reference") or {}).get("s_per_epoch") / s["jaxsel"]["s_per_epoch"]
                     for s in sp if (s.get("reference") or {}).get("s_per_epoch")]
        jq = {(q["data"], q["seed"]): q for q in quality if q["model"] == model and q["impl"] == "jaxsel"}
        rq = {(q["data"], q["seed"]): q for q in quality if q["model"] == model and q["impl"] == "reference"}
        if not sp and not jq:
            continue
        per_fit = [rq[k]["wall_s"] / (jq[k]["wall_s"] + (jq[k].get("compile_s") or 0.0)) for k in jq if k in rq
                   and rq[k].get("wall_s")]
        pe, pe_x = _range(per_epoch, "datasets")
        pf, pf_x = _range(per_fit, "fits")
        kj, kr = _mean([q["knn_acc"] for q in jq.values()]), _mean([q["knn_acc"] for q in rq.values()])
        if kj is None:
            qual = "not run"
        elif kr is None:
            qual = f"kNN acc {kj:.3f} (reference not run)"
        else:
            qual = f"kNN acc {kj:.3f} vs {kr:.3f} ({kj - kr:+.3f})"
        fold = "n/a"
        if model == "supervised" and fo:
            fold = (f"{fo['loop_run_s'] / fo['vmapped_run_s']:.2f}x ({fo['n_folds']} folds: one program "
                    f"{fo['vmapped_run_s']:.0f} s, loop {fo['loop_run_s']:.0f} s)")
            if "looped_program_run_s" in fo:  # the CPU default: folds looped inside one program
                fold = (f"vmapped {fo['loop_run_s'] / fo['vmapped_run_s']:.2f}x, looped in the program "
                        f"{fo['loop_run_s'] / fo['looped_program_run_s']:.2f}x ({fo['n_folds']} folds: "
                        f"{fo['vmapped_run_s']:.0f} s / {fo['looped_program_run_s']:.0f} s against a loop of fits "
                        f"{fo['loop_run_s']:.0f} s; bit for bit {sum(fo['looped_program_bitwise'])}/{fo['n_folds']} "
                        f"looped, {sum(fo['vmapped_bitwise'])}/{fo['n_folds']} vmapped)")
        na = "n/a" if ref_ok else "n/a (no reference run)"
        rows.append({
            "method": label, "benchmark": "markermap",
            "speedup_per_epoch": pe, "speedup_per_fit": pf,
            "per_epoch": (_x(pe) + pe_x) if pe else na,
            "per_fit": (_x(pf) + pf_x) if pf else na,
            "quality": qual, "fold_parallel": fold,
            "source": (f"markermap.json: {r.get('speed_epochs')} equal epochs; paper protocol, k=50, "
                       f"{', '.join(datasets_)}, {len(seeds)} seed(s)"),
        })
    return rows


def summary_sbnn(r: dict) -> list:
    rows = []
    quick = bool((r.get("args") or {}).get("quick"))
    tag = " (quick schedule: not the paper's)" if quick else ""
    m1, cb = r.get("m1", {}), r.get("cbmc", {})
    sb = m1.get("sbnn", {}).get("pretrain_freeze")
    cs = cb.get("sbnn", {}).get("pretrain_freeze")
    if sb or cs:
        parts = []
        if sb:
            parts.append(f"M1 test R² {sb['test_r2']['mean']:.3f} ± {sb['test_r2']['sd']:.3f} (paper 0.39 ± 0.03)")
        if cs:
            srrr_full = next(iter(cb.get("srrr", {}).values()), None)
            parts.append(f"CBMC {cs['test_r2']['mean']:.3f}" +
                         (f" vs full-rank sRRR {srrr_full['test_r2']['mean']:.3f}" if srrr_full else ""))
        fold = "n/a"
        if sb and sb.get("loop"):
            lp = sb["loop"]
            n = len(sb["test_r2"]["values"])
            fold = (f"{lp['run_s'] / sb['run_s']:.2f}x ({n} folds: one program {sb['run_s']:.0f} s, "
                    f"loop {lp['run_s']:.0f} s)")
        rows.append({"method": "Sparse bottleneck network", "benchmark": "sbnn", "speedup_per_epoch": None,
                     "speedup_per_fit": None, "per_epoch": "no runnable reference", "per_fit": "no runnable reference",
                     "quality": "; ".join(parts) + tag, "fold_parallel": fold,
                     "source": "bench_sbnn.json: 10-fold CV, paper's folds and preprocessing" if not quick
                     else "bench_sbnn.json --quick: 3 folds, short schedule"})
    srrr = m1.get("srrr", {})
    if srrr:
        paper = {2: "≈0.35", 16: "≈0.40"}
        qual = "; ".join(f"rank {v['rank']}: test R² {v['test_r2']['mean']:.3f} (paper {paper.get(v['rank'], '?')})"
                         for v in srrr.values())
        folds = "; ".join(f"rank {v['rank']}: {v['loop_run_s'] / v['run_s']:.2f}x" for v in srrr.values())
        rows.append({"method": "sRRR (sparse reduced-rank regression)", "benchmark": "sbnn", "speedup_per_epoch": None,
                     "speedup_per_fit": None, "per_epoch": "no reference run (compared with the paper)",
                     "per_fit": "no reference run", "quality": qual, "fold_parallel": folds,
                     "source": f"bench_sbnn.json: M1, {len(next(iter(srrr.values()))['test_r2']['values'])} folds, "
                               "25 genes, relaxed"})
    return rows


def _stai_best(s: dict):
    for mode in ("looped", "vmapped", "sharded_2_cpu_devices_looped", "sharded_2_cpu_devices"):
        if f"jaxsel_{mode}" in s:
            return mode, s[f"jaxsel_{mode}"]
    return None, None


def summary_stai(r: dict, ref_ok: bool) -> list:
    s = r.get("speed") or {}
    qual_parts = []
    for name, q in (r.get("quality") or {}).items():
        part = f"{name} median PCC {q['jaxsel']['pcc']:.3f} vs kNN baseline {q['knn']['pcc']:.3f}"
        if "pcc" in (q.get("gimvi") or {}):
            part += f" and gimVI {q['gimvi']['pcc']:.3f}"
        if q.get("reference_subset"):
            rs = q["reference_subset"]
            part += (f"; on the {len(rs['genes'])} genes the released code ran, jaxsel {rs['jaxsel_median_pcc']:.3f} "
                     f"vs released code {rs['median_pcc']:.3f}")
        qual_parts.append(part + f" ({q['gene_folds']} gene folds, {q['epochs']} epochs)")
    if not s and not qual_parts:
        return []
    ups = [(m, s[f"jaxsel_{m}"].get("speedup_per_epoch")) for m in ("vmapped", "looped", "sharded_2_cpu_devices",
                                                                     "sharded_2_cpu_devices_looped")
           if f"jaxsel_{m}" in s]
    na = "n/a" if ref_ok else "n/a (released code not run)"
    per_epoch = ", ".join(f"{u:.1f}x {m.replace('_', ' ')}" for m, u in ups if u) or na
    fits = [(m, s[f"jaxsel_{m}"].get("speedup_5x500")) for m, _ in ups]
    per_fit = ", ".join(f"{u:.1f}x {m.replace('_', ' ')}" for m, u in fits if u) or na
    fold = "n/a"
    if "jaxsel_vmapped" in s and "jaxsel_looped" in s:
        v, lp = s["jaxsel_vmapped"]["per_submodel_epoch_s"], s["jaxsel_looped"]["per_submodel_epoch_s"]
        fold = f"{lp / v:.2f}x (5 submodels vmapped {v:.3f} vs looped {lp:.3f} s per submodel-epoch)"
    best = max([u for _, u in ups if u] or [None], key=lambda u: u or 0)
    bestfit = max([u for _, u in fits if u] or [None], key=lambda u: u or 0)
    src = "bench_stai.json"
    if s:
        src += f": speed {s['epochs'][0]}/{s['epochs'][1]} epochs projected to 5 x 500"
    return [{"method": "stAI (imputation)", "benchmark": "stai", "speedup_per_epoch": best, "speedup_per_fit": bestfit,
             "per_epoch": per_epoch if s else "not run", "per_fit": per_fit if s else "not run",
             "quality": "; ".join(qual_parts) or "not run", "fold_parallel": fold, "source": src}]


def summary_gimvi(r: dict, ref_ok: bool) -> list:
    s = r.get("speed") or {}
    parts = []
    for name, q in (r.get("quality") or {}).items():
        j = q.get("jaxsel", {}).get("summary", {}).get("spearman")
        sc = q.get("scvi", {}).get("summary", {}).get("spearman")
        if j:
            parts.append(f"{name} Spearman {j[0]:.3f}" + (f" vs {sc[0]:.3f}" if sc else " (scvi-tools not run)")
                         + f" ({q['gene_folds']} folds x {q['seeds']} seeds, {q['epochs']} epochs)")
    if not s and not parts:
        return []
    na = "n/a" if ref_ok else "n/a (scvi-tools not run)"
    pe, pf = s.get("speedup_per_epoch"), s.get("speedup_200_epochs_with_compile")
    return [{"method": "gimVI", "benchmark": "gimvi", "speedup_per_epoch": pe, "speedup_per_fit": pf,
             "per_epoch": (f"{pe:.1f}x ({s.get('speedup_per_step', float('nan')):.1f}x per step)" if pe else na)
             if s else "not run",
             "per_fit": (f"{pf:.1f}x (200 epochs incl. compile)" if pf else na) if s else "not run",
             "quality": "; ".join(parts) or "not run",
             "fold_parallel": "not measured (folds x seeds always one program)",
             "source": "bench_gimvi.json" + (f": speed {s['epochs'][0]}/{s['epochs'][1]} epochs" if s else "")}]


# bench_scale's time per run that the cost curve is drawn with: an epoch, or sRRR's one pass
_SCALE_TIME = {"markermap": ("steady_epoch_s", "steady epoch"), "gimvi": ("steady_epoch_s", "steady epoch"),
               "srrr": ("moments_s", "its one pass (moments)"), "hvg": ("moments_s", "its one pass"),
               "de": ("moments_s", "its one pass (t-test)"), "stai": ("moments_s", "its one pass (inputs only)")}


def scale_line(r: dict) -> str | None:
    runs = r.get("runs") or []
    if not runs:
        return None
    parts = []
    for method in _SCALE_TIME:
        rs = sorted([x for x in runs if x["method"] == method], key=lambda x: x["n_cells"])
        if rs:
            sl = (r.get("slopes") or {}).get(method)
            key, what = _SCALE_TIME[method]
            parts.append(f"{method}: {what} {rs[0][key]:.1f} s at {rs[0]['n_cells']:,} cells to "
                         f"{rs[-1][key]:.1f} s at {rs[-1]['n_cells']:,}"
                         + (f" (log-log slope {sl:.2f})" if sl is not None else "")
                         + f", peak RSS {rs[-1]['peak_rss_mb'] / 1024:.1f} GiB")
    return "Cost against cells (streamed from disk, `bench_scale.json`): " + "; ".join(parts) + "."


# ----------------------------------------------------------------------------- figures


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def fig_accuracy(r: dict, out: Path) -> str:
    """Accuracy against k per selector (kNN / RF rows, one column per dataset)."""
    import numpy as np

    rows = r.get("ksweep") or []
    note = ""
    if not rows:  # fall back to the quality phase's k = 50 points
        rows = [dict(q, k=50) for q in r.get("quality", []) if q.get("impl") in ("jaxsel", "-")]
        rows = [dict(q, model="random") if q.get("impl") == "-" else q for q in rows]
        if not rows:
            raise ValueError("markermap.json has neither a k sweep nor quality rows")
        note = "no k sweep in markermap.json: k = 50 points of the quality phase only"
    plt = _plt()
    datasets_ = list(dict.fromkeys(x["data"] for x in rows))
    selectors = [m for m in list(MM_MODELS) + list(BASELINE_NAMES) if any(x["model"] == m for x in rows)]
    refq = [q for q in r.get("quality", []) if q.get("impl") == "reference"]
    fig, axes = plt.subplots(2, len(datasets_), figsize=(max(4.6 * len(datasets_), 8), 7.8), squeeze=False)
    colors = plt.get_cmap("tab10")
    for j, data in enumerate(datasets_):
        for i, (metric, label) in enumerate((("knn_acc", "kNN accuracy"), ("rf_acc", "RF accuracy"))):
            ax = axes[i, j]
            for c, sel in enumerate(selectors):
                pts = {}
                for x in rows:
                    if x["data"] == data and x["model"] == sel and x.get(metric) is not None:
                        pts.setdefault(x["k"], []).append(x[metric])
                if not pts:
                    continue
                ks = sorted(pts)
                m = [np.mean(pts[k]) for k in ks]
                sd = [np.std(pts[k]) if len(pts[k]) > 1 else 0.0 for k in ks]
                base = sel in BASELINE_NAMES
                ax.errorbar(ks, m, yerr=sd, marker="s" if base else "o", ms=4, lw=1.3, capsize=2,
                            ls="--" if base else "-", color=colors(c % 10),
                            label=BASELINE_NAMES.get(sel) or MM_MODELS.get(sel, sel))
                rv = [q[metric] for q in refq if q["data"] == data and q["model"] == sel]
                if rv:
                    ax.plot([50], [np.mean(rv)], marker="*", ms=11, mfc="none", color=colors(c % 10), ls="none")
            ax.set_xscale("log")
            ks_all = sorted({x["k"] for x in rows})
            ax.set_xticks(ks_all)
            ax.set_xticklabels([str(k) for k in ks_all])
            ax.minorticks_off()
            ax.set_xlabel("number of markers k")
            ax.set_ylabel(label)
            ax.set_title(f"{data}")
            ax.grid(alpha=0.3)
    h, lab = axes[0, 0].get_legend_handles_labels()
    h.append(plt.Line2D([], [], marker="*", ms=11, mfc="none", color="k", ls="none"))
    lab.append("markermap 1.0.3 reference (k = 50)")
    ncol = 5 if len(datasets_) > 1 else 3
    fig.legend(h, lab, loc="lower center", ncol=ncol, fontsize=8, frameon=False)
    st = r.get("ksweep_settings") or {}
    proto = (f"jaxsel selectors: {st['epochs']} fixed epochs" if st.get("epochs") else
             "jaxsel selectors: the paper's protocol") if st else note
    fig.suptitle(f"Accuracy of the markers on the test split against k ({proto}; dashed: plain baselines)",
                 fontsize=10)
    fig.tight_layout(rect=(0, 0.01 + 0.028 * math.ceil(len(lab) / ncol), 1, 0.95))
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return note


def time_rows(results: dict) -> tuple:
    """(per-epoch rows, per-fit rows): (label, jaxsel s, reference s or None)."""
    per_epoch, per_fit = [], []
    mm = results.get("markermap")
    if mm:
        for model, label in MM_MODELS.items():
            sp = [s for s in mm.get("speed", []) if s["model"] == model]
            if sp:
                j = _gmean([s["jaxsel"]["s_per_epoch"] for s in sp])
                rr = _gmean([(s.get("reference") or {}).get("s_per_epoch") for s in sp])
                n = len({s["data"] for s in sp})
                per_epoch.append((label + (f" (geo. mean, {n} datasets)" if n > 1 else f" ({sp[0]['data']})"), j, rr))
            jq = [q for q in mm.get("quality", []) if q["model"] == model and q["impl"] == "jaxsel"]
            rq = [q for q in mm.get("quality", []) if q["model"] == model and q["impl"] == "reference"]
            if jq:
                n = len({q["data"] for q in jq})
                per_fit.append((label + (f" (geo. mean, {n} datasets)" if n > 1 else f" ({jq[0]['data']})"),
                                _gmean([q["wall_s"] + (q.get("compile_s") or 0) for q in jq]),
                                _gmean([q.get("wall_s") for q in rq])))
    st = (results.get("stai") or {}).get("speed")
    if st:
        mode, j = _stai_best(st)
        ref = st.get("reference")
        per_epoch.append((f"stAI (per submodel, {mode})", j["per_submodel_epoch_s"],
                          ref["per_submodel_epoch_s"] if ref else None))
        per_fit.append(("stAI 5 x 500 epochs (projected)", j["projected_5x500_s"] + j["compile_s"],
                        ref["projected_5x500_s"] if ref else None))
    gv = (results.get("gimvi") or {}).get("speed")
    if gv:
        ref = gv.get("reference")
        per_epoch.append(("gimVI", gv["jaxsel"]["per_epoch_s"], ref["per_epoch_s"] if ref else None))
        per_fit.append(("gimVI 200 epochs", gv["jaxsel"]["total_200_s"], ref["total_200_s"] if ref else None))
    sb = results.get("sbnn")
    if sb:
        r = sb.get("m1", {}).get("sbnn", {}).get("pretrain_freeze")
        if r:
            n = len(r["test_r2"]["values"])
            per_fit.append((f"sBNN {n}-fold CV (M1)", r["run_s"] + r["compile_s"], None))
        for name, v in sb.get("m1", {}).get("srrr", {}).items():
            per_fit.append((f"{name} {len(v['test_r2']['values'])}-fold CV", v["run_s"] + v["compile_s"], None))
    return per_epoch, per_fit


def fig_time(results: dict, out: Path) -> str:
    import numpy as np

    per_epoch, per_fit = time_rows(results)
    if not per_epoch and not per_fit:
        raise ValueError("no timings in the results")
    plt = _plt()
    panels = [(p, t) for p, t in ((per_epoch, "seconds per epoch (equal epochs)"),
                                  (per_fit, "seconds per fit (whole protocol; jaxsel incl. compile)")) if p]
    fig, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 0.45 * max(len(p) for p, _ in panels) + 2.2),
                             squeeze=False)
    for ax, (rows, title) in zip(axes[0], panels):
        y = np.arange(len(rows))
        j = [r[1] for r in rows]
        rr = [r[2] if r[2] is not None else np.nan for r in rows]
        ax.barh(y - 0.2, j, 0.4, label="jaxsel", color="tab:blue")
        ax.barh(y + 0.2, rr, 0.4, label="reference", color="tab:orange")
        for yi, a, b in zip(y, j, rr):
            ax.text(a, yi - 0.2, f" {a:.3g}", va="center", fontsize=7)
            if not np.isnan(b):
                ax.text(b, yi + 0.2, f" {b:.3g} ({b / a:.1f}x)", va="center", fontsize=7)
            else:
                ax.text(a, yi + 0.2, "  no reference", va="center", fontsize=7, color="grey")
        ax.set_yticks(y)
        ax.set_yticklabels([r[0] for r in rows], fontsize=8)
        ax.invert_yaxis()
        ax.set_xscale("log")
        top = np.nanmax(np.r_[j, rr])
        ax.set_xlim(right=top * 4)
        ax.set_xlabel("seconds (log scale)")
        ax.set_title(title, fontsize=10)
        ax.grid(axis="x", alpha=0.3)
    h, lab = axes[0, 0].get_legend_handles_labels()
    fig.legend(h, lab, loc="upper center", ncol=2, fontsize=9, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.94))
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return ""


def fig_scale(r: dict, out: Path) -> str:
    import numpy as np

    runs = r.get("runs") or []
    if not runs:
        raise ValueError("bench_scale.json has no runs")
    plt = _plt()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for method, marker in (("markermap", "o"), ("gimvi", "s"), ("srrr", "^"), ("hvg", "v"), ("de", "D"),
                           ("stai", "x")):
        rs = sorted([x for x in runs if x["method"] == method], key=lambda x: x["n_cells"])
        if not rs:
            continue
        n = np.array([x["n_cells"] for x in rs], float)
        t = np.array([x[_SCALE_TIME[method][0]] for x in rs])
        sl = (r.get("slopes") or {}).get(method)
        a1.loglog(n, t, marker=marker, label=method + (f" (slope {sl:.2f})" if sl is not None else ""))
        a1.loglog(n, t[0] * n / n[0], ls=":", color="grey")
        a2.semilogx(n, [x["peak_rss_mb"] / 1024 for x in rs], marker=marker, label=method)
    a1.set_xlabel("cells")
    a1.set_ylabel("seconds per epoch (steady; one-pass fits: the pass)")
    a1.set_title("one epoch streamed from disk (dotted: linear)", fontsize=10)
    a1.legend(fontsize=8)
    a2.set_xlabel("cells")
    a2.set_ylabel("peak RSS (GiB)")
    a2.set_ylim(bottom=0)
    a2.set_title("peak resident memory", fontsize=10)
    a2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return ""


# ----------------------------------------------------------------------------- markdown


def _demote(md: str, levels: int = 2) -> str:
    out = []
    for line in md.splitlines():
        if line.startswith("#"):
            line = "#" * levels + line
        out.append(line)
    return "\n".join(out)


def render(rep: dict) -> str:
    m, v = rep["machine"], rep["versions"]
    jax_v = v.get("jax", {})
    ref_v = v.get("reference", {})
    L = [f"# jaxsel benchmark report ({rep['preset']})", ""]
    pr = rep.get("previous_run")
    tot = sum(b.get("wall_s") or 0.0 for b in rep["benchmarks"].values() if b.get("command"))
    L.append(f"Generated {rep['finished']} by `{rep['command']}`"
             + (f"; benchmarks ran {rep['wall_s'] / 60:.1f} min in this invocation"
                + (f" (the wall times below sum to {tot / 60:.1f} min)." if abs(tot - rep["wall_s"]) > 60 else ".")
                if rep.get("ran") else
                (f", re-rendered from the results of `{pr['command']}` (started {pr['started']}, benchmarks ran "
                 f"{pr['wall_s'] / 60:.1f} min; the wall times below sum to {tot / 60:.1f} min)." if pr
                 else " (re-rendered from existing results).")))
    L.append("")
    L.append(f"**Machine**: {m['cpu']}, {m['cores']} cores, {m['ram_gb']} GB RAM, GPU: {m['gpu']}; "
             f"JAX devices {jax_v.get('jax_devices')}; {m['platform']}; load average at start {m.get('loadavg')}.")
    L.append("")
    vv = {**jax_v.get("versions", {}), **{k: x for k, x in ref_v.get("versions", {}).items() if k in REF_PKGS}}
    L.append(f"**Versions**: python {jax_v.get('python')}; " + ", ".join(f"{k} {x}" for k, x in vv.items()) + ".")
    L.append("")
    g = rep["git"]
    L.append(f"**Commit**: `{g.get('short')}` {g.get('subject')}"
             + (f" (+{g['dirty_files']} uncommitted files)" if g.get("dirty_files") else "") + ".")
    L.append("")
    if rep.get("omp_passive"):
        L += ["The benchmarks ran with `OMP_WAIT_POLICY=PASSIVE` (`--omp-passive`): torch's timings are not those "
              "of an idle machine's default.", ""]
    L.append("## Summary")
    L.append("")
    L.append("Speed-ups are reference time / jaxsel time on this machine (per epoch at equal epochs; per fit for "
             "the whole protocol, jaxsel's compilation included). Fold-parallel vs looped: loop time / one-program "
             "time (above 1x the fold axis pays).")
    L.append("")
    L.append("| method | speed-up per epoch | speed-up per fit | quality: jaxsel vs reference "
             "| fold-parallel vs looped "
             "| source |")
    L.append("|---|---|---|---|---|---|")
    for r in rep["summary"]:
        L.append(f"| {r['method']} | {r['per_epoch']} | {r['per_fit']} | {r['quality']} | {r['fold_parallel']} | "
                 f"{r['source']} |")
    L.append("")
    if rep.get("scale_line"):
        L += [rep["scale_line"], ""]
    L.append("References:")
    L.append("")
    for name in ORDER:
        L.append(f"- {name}: {rep['reference_notes'].get(name)}")
    L.append("")
    bad = {k: b for k, b in rep["benchmarks"].items() if b.get("status") not in ("ok", "reused")}
    if bad:
        L.append("Problems: " + "; ".join(f"{k} {b['status']}" for k, b in bad.items()) + " (details below).")
        L.append("")
    figs = rep.get("figures", {})
    L.append("## Figures")
    L.append("")
    for key, title in (("accuracy_vs_markers", "Accuracy against the number of markers"),
                       ("time_per_method", "Time per method"), ("cost_vs_cells", "Cost against the number of cells")):
        f = figs.get(key, {})
        if f.get("file"):
            L.append(f"**{title}**" + (f" ({f['note']})" if f.get("note") else ""))
            L.append("")
            L.append(f"![{title}]({Path(f['file']).name})")
        else:
            L.append(f"**{title}**: skipped, {f.get('note', 'no data')}.")
        L.append("")
    for name in ORDER:
        b = rep["benchmarks"].get(name)
        if not b:
            continue
        L.append(f"## {TITLES[name]}")
        L.append("")
        st = b["status"]
        if st == "reused":
            L.append("Reused from earlier results (not run by this report).")
        elif st == "missing":
            L.append(f"No results: {b.get('note', 'not run and no earlier JSON')}.")
        elif st == "skipped":
            L.append("Not run (--only / --skip).")
        else:
            L.append(f"Status **{st}** (exit {b.get('returncode')}) after {b['wall_s'] / 60:.1f} min: `{b['command']}`"
                     + f"; load average {b.get('loadavg_before')} -> {b.get('loadavg_after')}"
                     + (f" (run started {b.get('started')}; re-rendered since)." if b.get("rerendered") else "."))
        L.append("")
        L.append(f"Reference: {rep['reference_notes'].get(name)}.")
        L.append("")
        if st.startswith(("failed", "timeout")) or (st == "ok" and not b.get("sources")):
            tail = b.get("stderr_tail") or b.get("stdout_tail") or ""
            if st == "ok":
                L.append("The script exited cleanly but wrote no results; its output ends:")
            else:
                L.append("Its stderr ends:")
            L += ["", "```", tail[-3000:], "```", ""]
        for src in b.get("sources", []):
            f = Path(src["file"])
            L.append(f"Results `{f.relative_to(REPO) if f.is_relative_to(REPO) else f}` ({src.get('date')})"
                     + (f": `{src['command']}`" if src.get("command") else (f": `{b['command']}`" if b.get("command")
                                                                              else "")))
            L.append("")
            if src.get("md") and Path(src["md"]).exists():
                L.append(_demote(Path(src["md"]).read_text().strip()))
                L.append("")
    return "\n".join(L) + "\n"


# ----------------------------------------------------------------------------- main


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="reduced settings (about 25 min on 2 cores)")
    g.add_argument("--full", action="store_true", help="the published protocols (default; hours)")
    ap.add_argument("--only", default=None, help=f"comma list of benchmarks to run ({','.join(ORDER)}); "
                    "the others are reused from their JSONs when present")
    ap.add_argument("--skip", default="", help="comma list of benchmarks not to run (reused when present)")
    ap.add_argument("--reuse", action="store_true", help="run nothing: re-render from the existing JSONs")
    ap.add_argument("--python", default=sys.executable, help="interpreter for the jaxsel side (default: this one)")
    ap.add_argument("--ref-python", default=None,
                    help="interpreter with the references (torch, markermap, scvi-tools, torch_geometric); "
                         "default: this one when it can import them")
    ap.add_argument("--stai-path", default=None, help="checkout of github.com/gszou99/stAI (or $STAI_PATH)")
    ap.add_argument("--results-dir", default=None,
                    help="per-benchmark JSONs (default benchmarks/results, or benchmarks/results/quick with --quick)")
    ap.add_argument("--report-dir", default=str(RESULTS), help="where report.{json,md} and the figures go")
    ap.add_argument("--scale-data-dir", default=None, help="bench_scale.py's --data-dir (outside the repository)")
    ap.add_argument("--scale-sizes", type=cell_count, nargs="+", default=None,
                    help="bench_scale.py's --sizes (default: 10000 30000 with --quick, 10000 100000 1000000 with "
                         "--full)")
    ap.add_argument("--timeout-min", type=float, default=None,
                    help="per-benchmark time limit in minutes (default: 3x its estimate, at least 15; 0: none)")
    ap.add_argument("--omp-passive", action="store_true",
                    help="OMP_WAIT_POLICY=PASSIVE for the benchmarks: keeps torch's threads from spin-waiting "
                         "on a busy machine (changes the reference's timings on an idle one)")
    ap.add_argument("--dry-run", action="store_true", help="print the plan and the estimate, run nothing")
    args = ap.parse_args(argv)
    preset = "quick" if args.quick else "full"
    results = Path(args.results_dir) if args.results_dir else (RESULTS / "quick" if args.quick else RESULTS)
    results = results.resolve()
    report_dir = Path(args.report_dir).resolve()
    try:
        previous = json.loads((report_dir / "report.json").read_text())
    except Exception:  # noqa: BLE001 - no earlier report
        previous = {}
    t_start = time.time()

    refs = Refs(args)
    cmds = commands(preset, refs, results, args)
    selected = list(ORDER)
    if args.only:
        selected = [b for b in args.only.split(",") if b]
        unknown = set(selected) - set(ORDER)
        if unknown:
            ap.error(f"unknown benchmark(s) {sorted(unknown)}; choose from {','.join(ORDER)}")
    skip = set(filter(None, args.skip.split(",")))
    to_run = [] if args.reuse else [b for b in ORDER if b in selected and b not in skip]

    print(f"jaxsel benchmark report, preset {preset}; per-benchmark JSONs in {results}")
    for name in ORDER:
        s = refs.status[name]
        print(f"  reference for {name}: " + (f"{s['what']} ({s['python']})" if s["available"] else s["reason"]))
    if to_run:
        est = sum(_estimate(preset, b, args) for b in to_run)
        print(f"Running {', '.join(to_run)}; estimated {est:.0f} min "
              f"({est / 60:.1f} h) on an idle 2-core AMD EPYC (dev machine), references included:")
        for b in to_run:
            py, a = cmds[b]
            print(f"  {b} (~{_estimate(preset, b, args):.0f} min): {py} benchmarks/{SCRIPTS[b]} {' '.join(a)}")
    if args.dry_run:
        return 0
    load = _loadavg()
    if to_run and load and os.cpu_count() and load[0] > 0.5 * os.cpu_count():
        print(f"WARNING: load average {load} on {os.cpu_count()} cores: other processes are running; "
              "timings will be slow and noisy" + ("" if args.omp_passive else
                                                  " (torch spin-waits: consider --omp-passive)"), flush=True)

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # ends the running benchmark too (run_bench)
    env = dict(os.environ, PYTHONUNBUFFERED="1", MPLBACKEND="Agg")
    if args.omp_passive:
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    bench = {}
    t_runs = time.perf_counter()
    for name in to_run:
        py, a = cmds[name]
        out = results / FILES[name]
        if out.exists():  # keep the previous results next to it; this run starts clean
            out.replace(out.with_name(out.stem + ".prev.json"))
        t0 = time.time()
        limit = args.timeout_min if args.timeout_min is not None else max(15.0, 3.0 * _estimate(preset, name, args))
        info = run_bench(name, py, a, results / "logs", limit * 60 if limit else None, env)
        res, sources = load_results(name, results, fill_from_extra=False, newer_than=t0 - 1)
        info.update(results=res, sources=sources)
        if info["status"] in ("failed", "timeout") and res is not None:
            info["status"] += " (partial results kept)"
        bench[name] = info
    ran_wall = time.perf_counter() - t_runs
    for name in ORDER:
        if name in bench:
            continue
        res, sources = load_results(name, results, fill_from_extra=True, newer_than=None)
        if res is None and results != RESULTS and not args.results_dir:
            res, sources = load_results(name, RESULTS, fill_from_extra=True, newer_than=None)
        bench[name] = {"status": "reused" if res is not None else "missing", "results": res, "sources": sources,
                       "note": f"no {FILES[name]} in {results}" if res is None else None}
        # the run that wrote these very files (an earlier report.json): keep its status, command, wall time
        old = previous.get("benchmarks", {}).get(name, {})
        if res is not None and old.get("command") and _same_sources(old.get("sources"), sources):
            bench[name].update({k: old[k] for k in RUN_KEYS if k in old}, rerendered=True)

    # --------------------------------------------------------------- assemble
    jax_info = probe_python(args.python, with_jax=True) or {}
    ref_info = refs.ref_info or {}
    results_by = {k: b.get("results") for k, b in bench.items() if b.get("results") is not None}
    summary, notes = [], []
    has_ref = {k: reference_in_results(k, results_by.get(k)) for k in ORDER}
    ref_notes = {}
    for name in ORDER:
        st = refs.status[name]
        if name in ("sbnn", "scale"):
            ref_notes[name] = st["reason"]
        elif has_ref[name]:
            ref_notes[name] = "in the results" + (f" ({st['what']} via `{st['python']}`)" if name in to_run else "")
        elif name in to_run:
            ref_notes[name] = f"not run: {st.get('reason') or 'no reference numbers in the results'}"
        else:
            ref_notes[name] = "no reference numbers in the reused results"
    for name, fn in (("markermap", lambda r: summary_markermap(r, has_ref["markermap"])), ("sbnn", summary_sbnn),
                     ("stai", lambda r: summary_stai(r, has_ref["stai"])),
                     ("gimvi", lambda r: summary_gimvi(r, has_ref["gimvi"]))):
        if name in results_by:
            try:
                summary += fn(results_by[name])
            except Exception as e:  # noqa: BLE001 - an odd JSON must not sink the report
                notes.append(f"summary of {name} failed: {type(e).__name__}: {e}")
        else:
            summary.append({"method": {"markermap": "MarkerMap family", "sbnn": "Sparse bottleneck network / sRRR",
                                       "stai": "stAI", "gimvi": "gimVI"}[name], "benchmark": name,
                            "per_epoch": "no results", "per_fit": "no results", "quality": "no results",
                            "fold_parallel": "no results", "source": f"{name}: {bench[name]['status']}"})
    sl = None
    if "scale" in results_by:
        try:
            sl = scale_line(results_by["scale"])
        except Exception as e:  # noqa: BLE001
            notes.append(f"scale summary failed: {type(e).__name__}: {e}")
    report_dir.mkdir(parents=True, exist_ok=True)
    figures = {}
    for key, fn, src in (("accuracy_vs_markers", fig_accuracy, "markermap"), ("time_per_method", fig_time, None),
                         ("cost_vs_cells", fig_scale, "scale")):
        out = report_dir / f"report_{key}.png"
        if src is not None and src not in results_by:
            figures[key] = {"file": None, "note": f"no {FILES[src]} results" + (
                " (bench_scale.json absent)" if src == "scale" else "")}
            out.unlink(missing_ok=True)
            continue
        try:
            note = fn(results_by[src] if src else results_by, out)
            figures[key] = {"file": str(out), "note": note}
        except Exception as e:  # noqa: BLE001
            figures[key] = {"file": None, "note": f"failed: {type(e).__name__}: {e}"}
            out.unlink(missing_ok=True)
    rep = {
        "preset": preset,
        "command": "python " + " ".join([os.path.relpath(sys.argv[0], REPO) if Path(sys.argv[0]).exists()
                                          else sys.argv[0]] + sys.argv[1:]),
        "ran": bool(to_run),
        "previous_run": _previous_run(previous) if any(b.get("rerendered") for b in bench.values()) else None,
        "started": datetime.datetime.fromtimestamp(t_start, datetime.timezone.utc).isoformat(timespec="seconds"),
        "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "wall_s": ran_wall,
        "machine": dict(machine(), loadavg=load),
        "versions": {"jax": jax_info, "reference": ref_info},
        "git": git_info(),
        "references": refs.status,
        "reference_notes": ref_notes,
        "omp_passive": args.omp_passive,
        "results_dir": str(results),
        "summary": summary,
        "scale_line": sl,
        "notes": notes,
        "figures": figures,
        "benchmarks": {k: bench[k] for k in ORDER if k in bench},
    }
    if not to_run and rep["previous_run"] and all(b.get("rerendered") or b["status"] == "missing"
                                                  for b in bench.values()):
        # every result comes from that run: describe its machine, versions and commit, not today's
        for k in ("machine", "versions", "git", "omp_passive"):
            if k in previous:
                rep[k] = previous[k]
    md = render(rep)
    if notes:
        md += "\n## Notes\n\n" + "\n".join(f"- {n}" for n in notes) + "\n"
    (report_dir / "report.json").write_text(json.dumps(rep, indent=1, default=float))
    (report_dir / "report.md").write_text(md)
    print(f"\nWrote {report_dir / 'report.json'} and {report_dir / 'report.md'}"
          + (f"; benchmarks ran {ran_wall / 60:.1f} min" if to_run else ""))
    head = md.split("## Summary", 1)[1].split("## Figures", 1)[0] if "## Summary" in md else ""
    print("## Summary" + head)
    failed = [k for k, b in bench.items() if str(b.get("status")).startswith(("failed", "timeout"))]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

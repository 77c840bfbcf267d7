"""Run the authors' released stAI code on prepared arrays (a benchmark helper).

    <python with torch, torch_geometric, scanpy> benchmarks/reference_stai.py \
        --stai-path /path/to/stAI-checkout --inputs fold.npz --epochs 10 --out ref.json

The checkout (github.com/gszou99/stAI) is imported from ``--stai-path``; it is neither a
dependency nor vendored. Its ``stAI.main.train_and_impute`` is called unmodified for
each calibration submodel; the only shim is ``torch.device``, which the released code
hard-wires to ``cuda:<device_id>``: here it resolves to the CPU.

``--inputs`` holds what :mod:`bench_stai` prepared with jaxsel's recipe, identical to
jaxsel's inputs: ``x1`` [n1, G] / ``x2`` [n2, G] scaled spatial / reference expression of
the input genes, ``coords`` [n1, 2], ``labels`` [n2], ``ref_values`` [n2, m] the
reference's log-normalised expression of the held-out genes, ``truth`` [n1, m] (or
empty), ``cal_folds`` (object array of index arrays into the G input genes), ``seed``.
Writes per-submodel wall time, per-epoch time, peak RSS, and the averaged imputation.

``--task annotate`` runs ``stAI.main.train_and_annotate`` instead, with the authors'
annotation configuration (``demo/osmFISH_annotate.yaml``: clf 10, impute 2, genegraph 1,
class weights ``1 / count^p_class`` with p_class 2) on all genes of ``x1``/``x2``, one
submodel per ``cal_folds`` entry; ``sp_labels`` (the spatial cells' integer types, -1 for
a type the reference lacks) only feed the released code's own printed report. Writes the
class probabilities averaged over the submodels, as its ``evaluate_annotate`` does.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--stai-path", required=True)
    ap.add_argument("--inputs", required=True)
    ap.add_argument("--epochs", type=int, default=500)
    ap.add_argument("--out", required=True)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--task", choices=("impute", "annotate"), default="impute")
    args = ap.parse_args(argv)

    import anndata
    import pandas as pd
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    sys.path.insert(0, str(Path(args.stai_path).resolve()))
    import stAI.main as stai_main

    shim = types.ModuleType("torch_cpu_shim")
    shim.__dict__.update(torch.__dict__)
    shim.device = lambda *a, **k: torch.device("cpu")  # noqa: E731 - the only change
    stai_main.torch = shim

    z = np.load(args.inputs, allow_pickle=True)
    x1, x2 = z["x1"].astype(np.float32), z["x2"].astype(np.float32)
    genes = np.array([f"g{i}" for i in range(x1.shape[1])])
    sp = anndata.AnnData(X=x1, var=pd.DataFrame(index=genes))
    sp.obsm["spatial"] = z["coords"]
    rna = anndata.AnnData(X=x2, var=pd.DataFrame(index=genes))
    rna.obs["intlabel"] = z["labels"].astype(np.int64)
    ref_values = z["ref_values"].astype(np.float32)
    # the benchmark scores the imputation itself; the released code's own score breaks its
    # log line ("{:.4f}".format of an array) when a fold holds out more than one gene
    truth = None
    model_parameters = dict(d_hidden=64, d_latent=16, lam_clf=0.1, lam_cos=1, lam_genegraph=0, lam_impute=1,
                            lam_mmd=0.1, lam_recon=1)
    training = dict(device_id=0, eval_step=max(1, args.epochs), k_folds=len(z["cal_folds"]), lr=0.002,
                    num_epoch=args.epochs, rna_batchsize=-1, spatial_batchsize=-1, spatial_knn=10)
    if args.task == "annotate":
        sp.obs["intlabel"] = z["sp_labels"].astype(np.int64)
        model_parameters.update(lam_clf=10, lam_genegraph=1, lam_impute=2)
        training["p_class"] = 2
    outputs, seconds = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for j, cal in enumerate(z["cal_folds"]):
            cal = np.asarray(cal, dtype=np.int64)
            fit = np.setdiff1d(np.arange(len(genes)), cal)
            save = Path(tmp) / f"submodel_{j}"
            save.mkdir()
            t0 = time.perf_counter()
            if args.task == "annotate":
                probs = stai_main.train_and_annotate(sp, rna, genes[fit], genes[cal], model_parameters, training,
                                                     int(z["seed"]))
                outputs.append(probs[args.epochs])
            else:
                stai_main.train_and_impute(sp, rna, truth, ref_values, genes[fit], genes[cal], model_parameters,
                                           training, int(z["seed"]), str(save))
                outputs.append(np.load(save / "impute_res" / f"epoch_{args.epochs}.npy"))
            seconds.append(time.perf_counter() - t0)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    averaged = np.mean(outputs, axis=0)
    out = {
        "epochs": args.epochs,
        "submodel_seconds": seconds,
        "seconds_per_submodel_epoch": float(np.sum(seconds) / (len(seconds) * args.epochs)),
        "peak_rss_mb": peak_mb,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    np.save(Path(args.out).with_suffix(".npy"), averaged)
    Path(args.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()

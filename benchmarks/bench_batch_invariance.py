"""Does XLA round an op the same for one fold and for a batch of folds?

A fold fitted inside a vmapped (or sharded) program equals the fold fitted alone bit for
bit only if every op of the fit gives each batch element exactly the result it gives
unbatched. This checks the ops a MarkerMap step is built from, at Paul15's gene count
(3451) and batch size 64: each op unbatched, then under ``vmap`` with batch 1, 2 and 5
of identical copies, and the largest absolute difference of any copy from the
unbatched result. 0 means batch-invariant on this machine and XLA version.

    python benchmarks/bench_batch_invariance.py   # writes benchmarks/results/batch_invariance.{json,md}
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_markermap import machine_info, write_results  # noqa: E402

from jaxsel.nn import softmax  # noqa: E402

def pairwise_sum(v):
    """Sum of ``v`` [n] in a fixed order: zero-padded to a power of two, then halves
    added elementwise until one value is left. Elementwise adds round the same with or
    without a batch axis, so this order cannot depend on how XLA vectorises a reduce."""
    n = v.shape[0]
    v = jnp.concatenate([v, jnp.zeros(((1 << (n - 1).bit_length()) - n,), v.dtype)])
    while v.shape[0] > 1:
        v = v[: v.shape[0] // 2] + v[v.shape[0] // 2:]
    return v[0]


OPS = {
    "x @ w (64x3451 @ 3451x256)": lambda x, w, v: x @ w,
    "x.T @ (x @ w)": lambda x, w, v: x.T @ (x @ w),
    "mean over cells (axis 0)": lambda x, w, v: jnp.mean(x, 0),
    "variance over cells of x @ w": lambda x, w, v: jnp.var(x @ w, 0),
    "sum(exp(v - max v)), v [3451]": lambda x, w, v: jnp.sum(jnp.exp(v - jnp.max(v))),
    "jax.nn.softmax(v)": lambda x, w, v: jax.nn.softmax(0.5 * v),
    "jaxsel.nn.softmax(v)": lambda x, w, v: softmax(0.5 * v),
    "logsumexp over genes (axis 1)": lambda x, w, v: jax.nn.logsumexp(x, axis=1),
    "sum(v * v), v [3451]": lambda x, w, v: jnp.sum(v * v),
    "sum(v), v [3451]": lambda x, w, v: jnp.sum(v),
    "pairwise_sum(exp(v)), fixed order": lambda x, w, v: pairwise_sum(jnp.exp(v - jnp.max(v))),
    "pairwise_sum(v * v), fixed order": lambda x, w, v: pairwise_sum(v * v),
}


def run(batches=(1, 2, 5), n_genes=3451, n_cells=64, hidden=256) -> dict:
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((n_cells, n_genes)).astype(np.float32))
    w = jnp.asarray(rng.standard_normal((n_genes, hidden)).astype(np.float32) * 0.02)
    v = jnp.asarray(rng.standard_normal((n_genes,)).astype(np.float32))
    rows = []
    for name, f in OPS.items():
        alone = jax.jit(f)(x, w, v)
        diffs = {}
        for b in batches:
            stack = lambda t: jnp.stack([t] * b)  # noqa: E731
            out = jax.jit(jax.vmap(f))(stack(x), stack(w), stack(v))
            diffs[str(b)] = float(jnp.max(jnp.abs(out - alone[None])))
        rows.append({"op": name, "max_abs_diff_by_batch": diffs})
    return {"machine": machine_info(), "shapes": dict(n_cells=n_cells, n_genes=n_genes, hidden=hidden), "ops": rows}


def render(res: dict) -> str:
    m = res["machine"]
    batches = list(res["ops"][0]["max_abs_diff_by_batch"])
    out = ["# Batch invariance of XLA ops (vmapped vs alone)", "",
           f"{m.get('cpu')}, {m.get('date')}; jax {m.get('versions', {}).get('jax')}. Max |vmapped copy - unbatched|, 0 = bitwise.", "",
           "| op | " + " | ".join(f"batch {b}" for b in batches) + " |", "|---|" + "---|" * len(batches)]
    for r in res["ops"]:
        out.append(f"| {r['op']} | " + " | ".join(f"{r['max_abs_diff_by_batch'][b]:.3g}" for b in batches) + " |")
    return "\n".join(out) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(HERE / "results" / "batch_invariance.json"))
    args = ap.parse_args()
    res = run()
    write_results(res, args.out, render)
    print(render(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

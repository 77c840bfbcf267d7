"""What the count likelihoods cost in a gimVI training step.

Value and gradient (``jax.value_and_grad``, as a training step takes them) of the summed
log-likelihood over one scRNA-seq minibatch of gimVI's speed benchmark, 128 cells x 1000
genes with per-gene inverse dispersions, for:

- jaxsel's ZINB, NB and Poisson (:mod:`jaxsel.losses`);
- the textbook form of the NB coefficient, ``lgamma(x + theta) - lgamma(theta) -
  lgamma(x + 1)`` with ``jnp.logaddexp``/``jax.nn.softplus`` (what scvi-tools writes in
  torch), in the same ZINB, as the yardstick for the likelihood alone;
- a 128 x 128 x 1000 matmul, the size of gimVI's decoder output layer, as the yardstick
  for the machine.

Counts are negative binomial draws (about half zeros, like the benchmark's Zeisel
reference). Each timing is the fastest of 5 repeats of 100 calls.

    python benchmarks/bench_likelihood.py   # writes benchmarks/results/bench_likelihood.{json,md}
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_markermap import machine_info, write_results  # noqa: E402

from jaxsel import losses  # noqa: E402


def _textbook_zinb(x, log_mu, log_theta, zi):
    theta = jnp.exp(log_theta)
    coef = jax.lax.lgamma(x + theta) - jax.lax.lgamma(theta) - jax.lax.lgamma(x + 1.0)
    log_t_mu = jnp.logaddexp(log_theta, log_mu)
    nb = coef + theta * (log_theta - log_t_mu) + x * (log_mu - log_t_mu)
    nb0 = theta * (log_theta - log_t_mu)
    s = jax.nn.softplus(zi)
    return jnp.where(x > 0, nb - s, jnp.logaddexp(zi - s, nb0 - s))


def _time(f, *args, repeats=5, calls=100) -> float:
    jax.block_until_ready(f(*args))
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            out = f(*args)
        jax.block_until_ready(out)
        best = min(best, (time.perf_counter() - t0) / calls)
    return best


def run(n_cells=128, n_genes=1000) -> dict:
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.negative_binomial(0.5, 0.3, size=(n_cells, n_genes)).astype(np.float32))
    log_mu = jnp.asarray(rng.normal(size=(n_cells, n_genes)).astype(np.float32))
    log_theta = jnp.asarray(rng.normal(size=(n_genes,)).astype(np.float32))
    zi = jnp.asarray(rng.normal(size=(n_cells, n_genes)).astype(np.float32))

    def vg(logp, n_args):
        return jax.jit(jax.value_and_grad(lambda *a: -jnp.sum(logp(x, *a)), argnums=tuple(range(n_args))))

    cases = {
        "ZINB (jaxsel)": (vg(losses.zinb_log_prob_logits, 3), (log_mu, log_theta, zi)),
        "ZINB (textbook lgamma form)": (vg(_textbook_zinb, 3), (log_mu, log_theta, zi)),
        "NB (jaxsel)": (vg(losses.nb_log_prob_logits, 2), (log_mu, log_theta)),
        "Poisson (jaxsel)": (vg(losses.poisson_log_prob_logits, 1), (log_mu,)),
    }
    rows = [{"case": k, "ms": 1e3 * _time(f, *a)} for k, (f, a) in cases.items()]
    h = jnp.asarray(rng.normal(size=(n_cells, 128)).astype(np.float32))
    w = jnp.asarray(rng.normal(size=(128, n_genes)).astype(np.float32))
    mm = 1e3 * _time(jax.jit(lambda h, w: h @ w), h, w)
    rows.append({"case": f"matmul {n_cells}x128 @ 128x{n_genes} (yardstick)", "ms": mm,
                 "gflops": 2 * n_cells * 128 * n_genes / (mm * 1e-3) / 1e9})
    # the two ZINB forms agree (the textbook one loses ~1e-3 nats to cancellation at large counts)
    a = _textbook_zinb(x, log_mu, log_theta, zi)
    b = losses.zinb_log_prob_logits(x, log_mu, log_theta, zi)
    return {"machine": machine_info(), "shape": [n_cells, n_genes], "zero_fraction": float(jnp.mean(x == 0)),
            "max_abs_diff_textbook_vs_jaxsel": float(jnp.max(jnp.abs(a - b))), "rows": rows}


def render(res: dict) -> str:
    m = res["machine"]
    n, g = res["shape"]
    lines = ["# Count likelihoods: value and gradient over one minibatch", "",
             f"Machine: {m.get('cpu')} ({m.get('cores')} cores), {m.get('platform')}; versions {m.get('versions')}; "
             f"{m.get('date')}", "", "Command: `python benchmarks/bench_likelihood.py`", "",
             f"{n} cells x {g} genes, per-gene theta, {100 * res['zero_fraction']:.0f}% zero counts; fastest of 5 x 100 "
             "calls.", "", "| case | ms |", "|---|---|"]
    lines += [f"| {r['case']} | {r['ms']:.3f}" + (f" ({r['gflops']:.0f} GFLOP/s)" if "gflops" in r else "") + " |"
              for r in res["rows"]]
    lines += ["", f"Largest difference between the two ZINB forms: {res['max_abs_diff_textbook_vs_jaxsel']:.2e} nats.",
              ""]
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(HERE / "results" / "bench_likelihood.json"))
    args = ap.parse_args(argv)
    res = run()
    write_results(res, args.out, render)
    print(render(res))


if __name__ == "__main__":
    main()

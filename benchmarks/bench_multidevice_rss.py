"""Resident memory of one compiled loop on one and on several CPU devices.

    python benchmarks/bench_multidevice_rss.py                  # 1 and 2 devices, 200/800/3200 steps
    python benchmarks/bench_multidevice_rss.py --devices 2 --no-shard       # one device of a 2-device process
    python benchmarks/bench_multidevice_rss.py --devices 2 --loop grad      # the gradient, no scan in it
    python benchmarks/bench_multidevice_rss.py --devices 2 --loop scan      # the scan, no gradient

Why: stAI's fold-parallel fit on 2 CPU devices (``JAX_NUM_CPU_DEVICES=2``) grows its
resident memory with the epochs (24 GB after about 35 minutes of the osmFISH protocol),
while on one device it stays flat. This reduces that to a few lines without jaxsel: a
``fori_loop`` whose body takes the gradient of a ``lax.scan`` over row tiles (the shape
of stAI's MMD: 128-row tiles of a 2420 x 16 latent against 2419 reference cells), the
loop vmapped over one model per device and ``shard_map``-ped over a ``("folds",)``
mesh, exactly as :func:`jaxsel.engine.map_folds` runs it. Each setting runs in a fresh
process (the device count is fixed at start-up); the figure is the RSS after the call
minus before it (compilation done beforehand), so it counts only what the running loop
kept. ``--no-shard`` runs the same loop on one device of a multi-device process;
``--loop`` swaps the loop's body: ``grad-scan`` (the default, the gradient of the tiled
scan), ``grad`` (the gradient of the same sum computed in one piece, no scan) or ``scan``
(the tiled scan's value, no gradient). Results go to ``--out`` (JSON) and a markdown
table beside it, with the machine and versions.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

CHILD = r"""
import json, os, sys, time
import jax, jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh, PartitionSpec as P

steps, shard, loop = int(sys.argv[1]), sys.argv[2] == "1", sys.argv[3]

def loss(x):
    y = x[:2419]
    tiles = x[:2304].reshape(-1, 128, 16)
    return lax.scan(lambda c, a: (c + jnp.sum(jnp.exp(-(a @ y.T) ** 2)), None), 0.0, tiles)[0]

def whole(x):  # the same sum, no scan
    return jnp.sum(jnp.exp(-(x[:2304] @ x[:2419].T) ** 2))

step = {"grad-scan": jax.grad(loss), "grad": jax.grad(whole),
        "scan": lambda x: jnp.broadcast_to(loss(x), x.shape)}[loop]

def one(x):
    return lax.fori_loop(0, steps, lambda i, x: x - 1e-4 * step(x), x)

n = len(jax.devices()) if shard else 1
body = lambda x: jax.vmap(one)(x)
if shard:
    mesh = Mesh(jax.devices(), ("folds",))
    body = jax.shard_map(body, mesh=mesh, in_specs=P("folds"), out_specs=P("folds"), check_vma=False)
f = jax.jit(body)
x = jax.random.normal(jax.random.key(0), (n, 2420, 16))
rss = lambda: int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
f = f.lower(x).compile()
r0, t0 = rss(), time.perf_counter()
jax.block_until_ready(f(x))
print(json.dumps({"steps": steps, "devices": len(jax.devices()), "sharded": shard, "loop": loop,
                  "seconds": time.perf_counter() - t0, "rss_growth_mb": rss() - r0}))
"""


def render(res: dict) -> str:
    m = res["machine"]
    rows = [f"# Resident memory of one compiled loop on CPU devices\n\nMachine: {m['cpu']} ({m['cores']} cores), "
            f"{m['platform']}; versions {m['versions']}; {m['date']}\n\nCommand: `{res['command']}`\n",
            "| CPU devices | sharded | loop | loop steps | s | RSS growth MB | MB per step |",
            "|---|---|---|---|---|---|---|"]
    rows += [f"| {r['devices']} | {'yes' if r['sharded'] else 'no'} | {r['loop']} | {r['steps']} | {r['seconds']:.1f} | "
             f"{r['rss_growth_mb']:.0f} | {r['rss_growth_mb'] / r['steps']:.3f} |" for r in res["runs"]]
    return "\n".join(rows) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--devices", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--steps", type=int, nargs="+", default=[200, 800, 3200])
    ap.add_argument("--no-shard", action="store_true", help="one device's computation only, in each process")
    ap.add_argument("--loop", choices=("grad-scan", "grad", "scan"), default="grad-scan",
                    help="the loop's body: gradient of the tiled scan, gradient without the scan, scan without gradient")
    ap.add_argument("--out", default=str(HERE / "results" / "bench_multidevice_rss.json"))
    args = ap.parse_args(argv)
    if min(args.devices) < 1 or min(args.steps) < 1:
        ap.error("--devices and --steps take positive integers")
    from bench_markermap import machine_info, write_results

    res = {"machine": machine_info(), "command": " ".join(["python", *sys.argv]), "runs": []}
    print(render(res), end="", flush=True)
    for d in args.devices:
        for s in args.steps:  # a fresh process each: the device count is fixed when JAX starts
            env = dict(os.environ, JAX_NUM_CPU_DEVICES=str(d), JAX_PLATFORMS="cpu")
            p = subprocess.run([sys.executable, "-c", CHILD, str(s), "0" if args.no_shard else "1", args.loop],
                               env=env, capture_output=True, text=True)
            if p.returncode:
                raise SystemExit(f"the run on {d} device(s), {s} steps failed:\n{p.stderr[-3000:]}")
            res["runs"].append(json.loads(p.stdout.strip().splitlines()[-1]))
            print(render(res).splitlines()[-1], flush=True)
    write_results(res, args.out, render)


if __name__ == "__main__":
    main()

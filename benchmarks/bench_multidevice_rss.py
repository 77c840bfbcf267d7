"""Resident memory of one compiled loop on one and on several CPU devices.

    python benchmarks/bench_multidevice_rss.py                  # 1 and 2 devices, 200/800/3200 steps
    python benchmarks/bench_multidevice_rss.py --devices 1 4 --steps 400 1600

Why: stAI's fold-parallel fit on 2 CPU devices (``JAX_NUM_CPU_DEVICES=2``) grows its
resident memory with the epochs (24 GB after about 35 minutes of the osmFISH protocol),
while on one device it stays flat. This reduces that to a few lines without jaxsel: a
``fori_loop`` whose body takes the gradient of a ``lax.scan`` over row tiles (the shape
of stAI's MMD: 128-row tiles of a 2420 x 16 latent against 2419 reference cells), the
loop vmapped over one model per device and ``shard_map``-ped over a ``("folds",)``
mesh, exactly as :func:`jaxsel.engine.map_folds` runs it. Each setting runs in a fresh
process (the device count is fixed at start-up); the figure is the RSS after the call
minus before it (compilation done beforehand), so it counts only what the running loop
kept. ``--no-shard`` runs the same loop on one device of a multi-device process.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

CHILD = r"""
import json, os, sys, time
import jax, jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh, PartitionSpec as P

steps, shard = int(sys.argv[1]), sys.argv[2] == "1"

def loss(x):
    y = x[:2419]
    tiles = x[:2304].reshape(-1, 128, 16)
    return lax.scan(lambda c, a: (c + jnp.sum(jnp.exp(-(a @ y.T) ** 2)), None), 0.0, tiles)[0]

def one(x):
    return lax.fori_loop(0, steps, lambda i, x: x - 1e-4 * jax.grad(loss)(x), x)

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
print(json.dumps({"steps": steps, "devices": len(jax.devices()), "sharded": shard,
                  "seconds": time.perf_counter() - t0, "rss_growth_mb": rss() - r0}))
"""


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--devices", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--steps", type=int, nargs="+", default=[200, 800, 3200])
    ap.add_argument("--no-shard", action="store_true", help="one device's computation only, in each process")
    args = ap.parse_args(argv)
    if min(args.devices) < 1 or min(args.steps) < 1:
        ap.error("--devices and --steps take positive integers")
    import jax  # the versions only; each measurement runs in its own process

    import datetime
    import platform

    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {platform.platform()}; "
          f"jax {jax.__version__}, jaxlib {jax.lib.__version__}; "
          f"{datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}")
    print("| CPU devices | sharded | loop steps | s | RSS growth MB | MB per step |")
    print("|---|---|---|---|---|---|")
    for d in args.devices:
        for s in args.steps:
            env = dict(os.environ, JAX_NUM_CPU_DEVICES=str(d), JAX_PLATFORMS="cpu")
            p = subprocess.run([sys.executable, "-c", CHILD, str(s), "0" if args.no_shard else "1"], env=env,
                               capture_output=True, text=True, check=True)
            r = json.loads(p.stdout.strip().splitlines()[-1])
            print(f"| {d} | {'yes' if r['sharded'] else 'no'} | {s} | {r['seconds']:.1f} | "
                  f"{r['rss_growth_mb']:.0f} | {r['rss_growth_mb'] / s:.3f} |", flush=True)


if __name__ == "__main__":
    main()

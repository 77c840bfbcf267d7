"""Where a supervised MarkerMap step goes on Paul15 (hidden 256, batch 64): full step with
Adam, the same step with plain SGD (difference = optimiser traffic), forward+backward only,
and the four large matmul products alone.

    python benchmarks/profile_markermap_step.py     # needs ../shared/data
"""
import sys, time, jax, jax.numpy as jnp, numpy as np, optax
from jaxsel import datasets, preprocessing as pp
from jaxsel.methods import markermap as mm
if datasets.shared_data_dir() is None:
    sys.exit("SKIP: ../shared/data not found")
x, y, genes = datasets.paper_dataset("paul15")
xp, _ = pp.markermap_recipe(x)
classes, yc = np.unique(y, return_inverse=True)
data = mm.make_data(xp, yc)
cfg = mm.MarkerMapConfig.create(xp.shape[1], 50, alpha=0.0, n_classes=len(classes), hidden_size=256, encoder_layers=3)
p, s = cfg.init(jax.random.key(0), data)
ctx = cfg.epoch_context(jnp.int32(0))
N = 58
def timed(tx):
    def run(p, s, key):
        os_ = tx.init(p) if tx is not None else None
        def body(c, k):
            p, s, os_ = c
            idx = jax.random.randint(k, (64,), 0, 2730)
            (l, (s, _)), g = jax.value_and_grad(cfg.train_loss, has_aux=True)(p, s, jax.tree.map(lambda a: a[idx], data), k, ctx)
            if tx is None:
                return (p, s, os_), (l, jax.tree.map(jnp.sum, g))
            u, os_ = tx.update(g, os_, p)
            return (optax.apply_updates(p, u), s, os_), (l, 0.0)
        return jax.lax.scan(body, (p, s, os_), jax.random.split(key, N))
    f = jax.jit(run); jax.block_until_ready(f(p, s, jax.random.key(0)))
    best = 1e9
    for r in range(3):
        t = time.perf_counter(); jax.block_until_ready(f(p, s, jax.random.key(r + 1))); best = min(best, time.perf_counter() - t)
    return best / N * 1e3
adam, sgd, grad_only = timed(optax.adam(1e-4)), timed(optax.sgd(1e-4)), timed(None)
a = jnp.ones((64, 3451)); w = jnp.ones((3451, 256)); g = jnp.ones((64, 256))
mm_f = jax.jit(lambda a, w, g: (a @ w, a @ w, a.T @ g, a.T @ g))
jax.block_until_ready(mm_f(a, w, g)); t = time.perf_counter()
for _ in range(100): o = mm_f(a, w, g)
jax.block_until_ready(o); four = (time.perf_counter() - t) / 100 * 1e3
n_params = sum(v.size for v in jax.tree.leaves(p))
print(f"params {n_params/1e6:.2f} M; per step: Adam step {adam:.2f} ms, SGD step {sgd:.2f} ms, grads only {grad_only:.2f} ms, "
      f"the 4 big products (64x3451x256) alone {four:.2f} ms")

"""engine.linalg: decompositions that are safe (and fold-exact) inside vmapped programs."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsel.engine import linalg


def _sym(rng, b, n):
    a = rng.standard_normal((b, n, n)).astype(np.float32)
    return a @ a.transpose(0, 2, 1) / n


def test_match_numpy_unbatched():
    rng = np.random.default_rng(0)
    g = _sym(rng, 1, 40)[0]
    w, v = linalg.eigh(g)
    np.testing.assert_allclose(np.asarray(w), np.linalg.eigvalsh(g.astype(np.float64)), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(v) * np.asarray(w) @ np.asarray(v).T, g, atol=1e-4)
    np.testing.assert_array_equal(np.asarray(linalg.eigvalsh(g)), np.asarray(jnp.linalg.eigvalsh(g)))
    a = rng.standard_normal((30, 7)).astype(np.float32)
    u, s, vt = linalg.svd(a, full_matrices=False)
    assert u.shape == (30, 7) and vt.shape == (7, 7)
    np.testing.assert_allclose(np.asarray(s), np.linalg.svd(a.astype(np.float64), compute_uv=False), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(u) * np.asarray(s) @ np.asarray(vt), a, atol=1e-5)
    np.testing.assert_allclose(np.asarray(linalg.svd(a, compute_uv=False)), np.asarray(s), rtol=1e-5)
    assert linalg.svd(a)[0].shape == (30, 30)


def test_vmapped_equals_looped_bitwise():
    rng = np.random.default_rng(1)
    g = _sym(rng, 5, 24)
    c = rng.standard_normal((5, 24, 6)).astype(np.float32)

    @jax.jit
    def one(g, c):
        lmax = linalg.eigvalsh(g)[-1]
        u, s, vt = linalg.svd(c, full_matrices=False)
        d, q = linalg.eigh(g)
        return lmax, u, s, vt, d, q

    batched = jax.jit(jax.vmap(one))(g, c)
    looped = [one(g[i], c[i]) for i in range(5)]
    for k, leaf in enumerate(batched):
        np.testing.assert_array_equal(np.asarray(leaf), np.stack([np.asarray(r[k]) for r in looped]))
    # one operand batched, the other shared; nested vmaps
    shared = jax.vmap(lambda c: linalg.svd(c @ c.T + g[0], compute_uv=False))(c)
    np.testing.assert_array_equal(np.asarray(shared[2]), np.asarray(linalg.svd(c[2] @ c[2].T + g[0], compute_uv=False)))
    nested = jax.vmap(jax.vmap(linalg.eigvalsh))(g.reshape(5, 1, 24, 24))
    np.testing.assert_array_equal(np.asarray(nested)[:, 0], np.asarray(batched[4]))


def test_rejects_batches():
    with pytest.raises(ValueError, match="one matrix"):
        linalg.eigvalsh(jnp.ones((2, 3, 3)))
    with pytest.raises(ValueError, match="one matrix"):
        linalg.svd(jnp.ones(3))


def test_many_concurrent_batched_decompositions_do_not_deadlock():
    # jaxlib 0.10's batched CPU LAPACK kernels block intra-op pool threads on work queued
    # to the same pool; several independent batched decompositions in one program (as
    # many as the pool has threads) hung forever at 0 % CPU. Run in a subprocess so a
    # regression fails on the timeout instead of hanging the test run.
    code = textwrap.dedent(
        """
        import jax, jax.numpy as jnp
        from jaxsel.engine import linalg

        @jax.jit
        def f(a, b):
            out = []
            for i in range(8):
                out.append(jax.vmap(linalg.eigvalsh)((a + i) @ (a + i).transpose(0, 2, 1))[:, -1])
                out.append(jax.vmap(lambda m: linalg.svd(m, compute_uv=False))((b + i) @ (b + i).mT)[:, 0])
            return out

        a = jax.random.normal(jax.random.key(0), (2, 200, 200))
        b = jax.random.normal(jax.random.key(1), (2, 200, 20))
        for _ in range(10):
            jax.block_until_ready(f(a, b))
        print("ok")
        """
    )
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("ok")

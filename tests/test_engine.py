"""Engine: loop semantics, early stopping, fold axis, no retracing, LR range test."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxsel import engine
from jaxsel.engine.loop import masked_permutation


# A tiny least-squares method: enough to exercise the engine without any model code.
@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["learning_rate", "script"],
    meta_fields=["n_features", "freeze_after"],
)
@dataclasses.dataclass(frozen=True)
class _Linear:
    n_features: int
    learning_rate: float = 0.05
    script: jax.Array | None = None  # when set, eval loss = script[epoch] (scripted early stopping)
    freeze_after: int | None = None
    traces = [0]  # class attribute: counts traces of train_loss

    def init(self, key, data):
        return {"w": 0.1 * jax.random.normal(key, (self.n_features,))}, {"steps": jnp.int32(0)}

    def optimizer(self, learning_rate):
        return optax.sgd(learning_rate)

    def epoch_context(self, epoch):
        ctx = {"epoch": epoch}
        if self.freeze_after is not None:  # per-epoch learning-rate schedule: 1, 1, ..., 0
            ctx["lr_scale"] = jnp.where(epoch < self.freeze_after, 1.0, 0.0)
        return ctx

    def train_loss(self, params, state, batch, key, ctx):
        type(self).traces[0] += 1
        noise = 1e-3 * jax.random.normal(key, batch["y"].shape)
        r = batch["x"] @ params["w"] - batch["y"] + noise
        return jnp.mean(r**2), ({"steps": state["steps"] + 1}, {"abs_w": jnp.sum(jnp.abs(params["w"]))})

    def eval_loss(self, params, state, batch, weights, ctx):
        r = batch["x"] @ params["w"] - batch["y"]
        loss = jnp.sum(weights * r**2) / jnp.sum(weights)
        if self.script is not None:
            loss = self.script[ctx["epoch"]]
        return loss, {"mse": loss}


def _regression(n=240, p=5, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, p)).astype(np.float32)
    w = np.arange(1, p + 1, dtype=np.float32)
    return {"x": jnp.asarray(x), "y": jnp.asarray(x @ w)}, w


def _folds(n, n_folds, seed=0):
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n)
    parts = np.array_split(perm, n_folds)
    trains = [np.concatenate([q for j, q in enumerate(parts) if j != i]) for i in range(n_folds)]
    vals = parts
    return engine.make_splits(trains, vals)


def test_masked_permutation_is_a_permutation_of_valid_entries():
    idx = jnp.arange(10, 20, dtype=jnp.int32)
    out = np.asarray(masked_permutation(jax.random.key(0), idx, 7))
    assert sorted(out[:7].tolist()) == list(range(10, 17))
    assert sorted(out[7:].tolist()) == [17, 18, 19]
    other = np.asarray(masked_permutation(jax.random.key(1), idx, 7))
    assert not np.array_equal(out[:7], other[:7])


def test_make_splits_pads_and_records_lengths():
    s = engine.make_splits([np.arange(5), np.arange(3)], [np.arange(2), np.arange(4)])
    assert s.train_idx.shape == (2, 5) and s.val_idx.shape == (2, 4)
    np.testing.assert_array_equal(s.n_train, [5, 3])
    np.testing.assert_array_equal(s.n_val, [2, 4])
    with pytest.raises(ValueError, match="validation"):
        engine.make_splits([np.arange(5)], [np.arange(0)])


def test_loop_config_rejects_bad_values():
    with pytest.raises(ValueError, match="min_epochs"):
        engine.LoopConfig(max_epochs=5, min_epochs=6)
    with pytest.raises(ValueError, match="batch_size"):
        engine.LoopConfig(batch_size=0)
    with pytest.raises(ValueError, match="patience"):
        engine.LoopConfig(patience=0)


def test_fit_converges_and_history_shape():
    data, w = _regression()
    split = _folds(240, 4).fold(0)
    loop = engine.LoopConfig(max_epochs=30, batch_size=16, min_epochs=0, patience=None)
    res = engine.fit(_Linear(5), loop, jax.random.key(0), data, split)
    np.testing.assert_allclose(res.params["w"], w, atol=2e-2)
    assert res.history["val_loss"].shape == (30,)
    assert int(res.n_epochs) == 30
    # Model state is carried through every optimiser step: 180 cells // 16 = 11 steps/epoch.
    assert int(res.model_state["steps"]) == 30 * 11
    assert float(res.history["val_loss"][-1]) < 1e-3 < float(res.history["val_loss"][0])


def test_per_epoch_learning_rate_schedule():
    data, _ = _regression()
    split = _folds(240, 4).fold(0)
    loop = engine.LoopConfig(max_epochs=6, batch_size=16, min_epochs=0, patience=None)
    frozen = engine.fit(_Linear(5, freeze_after=2), loop, jax.random.key(0), data, split)
    two = engine.fit(_Linear(5), dataclasses.replace(loop, max_epochs=2), jax.random.key(0), data, split)
    # Epochs 2.. have learning rate 0: the parameters are those after epoch 2 (up to the
    # last bit: the scaled update may be fused differently).
    np.testing.assert_allclose(frozen.params["w"], two.params["w"], rtol=1e-6)
    assert not np.allclose(frozen.params["w"], engine.fit(_Linear(5), loop, jax.random.key(0), data, split).params["w"], rtol=1e-3)
    assert int(frozen.model_state["steps"]) == 6 * 11  # the steps still ran


def _reference_early_stop(script, min_epochs, patience):
    """Lightning's rule: strict improvement resets the wait; stop when wait >= patience
    but never before min_epochs epochs."""
    best, wait, best_epoch = np.inf, 0, -1
    for epoch, v in enumerate(script):
        if v < best:
            best, wait, best_epoch = v, 0, epoch
        else:
            wait += 1
        if epoch + 1 >= min_epochs and wait >= patience:
            return epoch + 1, best_epoch
    return len(script), best_epoch


@pytest.mark.parametrize(
    "script,min_epochs,patience",
    [
        ([5, 4, 3, 3, 3, 3, 2, 1, 1, 1, 1, 1], 0, 3),  # plateau: stops after 3 non-improvements
        ([5, 4, 3, 3, 3, 3, 2, 1, 1, 1, 1, 1], 8, 3),  # min_epochs holds it past the first plateau
        ([5, 6, 7, 8, 9, 9, 9, 9, 9, 9, 9, 9], 2, 2),  # never improves after epoch 0
        ([9, 8, 7, 6, 5, 4, 3, 2, 1, 0, -1, -2], 0, 2),  # always improves: runs to the end
    ],
)
def test_early_stopping_matches_reference_rule(script, min_epochs, patience):
    data, _ = _regression()
    split = _folds(240, 4).fold(0)
    loop = engine.LoopConfig(max_epochs=len(script), batch_size=32, min_epochs=min_epochs, patience=patience)
    m = _Linear(5, script=jnp.asarray(script, jnp.float32))
    res = engine.fit(m, loop, jax.random.key(0), data, split)
    n_epochs, best_epoch = _reference_early_stop(script, min_epochs, patience)
    assert int(res.n_epochs) == n_epochs
    eligible = np.asarray(script[:n_epochs], np.float32)[max(min_epochs - 1, 0):]
    assert int(res.best_epoch) == max(min_epochs - 1, 0) + int(np.argmin(eligible))
    hist = np.asarray(res.history["val_loss"])
    np.testing.assert_array_equal(hist[:n_epochs], np.asarray(script[:n_epochs], np.float32))
    assert np.all(np.isnan(hist[n_epochs:]))


def test_best_validation_parameters_are_returned():
    # Scripted val loss is lowest at epoch 1; the returned params are that epoch's.
    data, _ = _regression()
    split = _folds(240, 4).fold(0)
    script = jnp.asarray([3.0, 1.0, 2.0, 2.0, 2.0, 2.0], jnp.float32)
    m = _Linear(5, script=script)
    loop = engine.LoopConfig(max_epochs=6, batch_size=32, min_epochs=0, patience=10)
    best = engine.fit(m, loop, jax.random.key(0), data, split)
    two = engine.fit(m, dataclasses.replace(loop, max_epochs=2, patience=None), jax.random.key(0), data, split)
    assert int(best.best_epoch) == 1
    np.testing.assert_array_equal(best.params["w"], two.params["w"])


def test_min_epochs_is_a_floor_for_the_returned_parameters():
    # Lowest loss at epoch 0, min_epochs=5, patience=3: patience counts from epoch 0
    # (Lightning), so the fit stops after 5 epochs; the parameters come from the best
    # epoch among those that may end the fit (epochs 4..), i.e. epoch 4, not epoch 0.
    data, _ = _regression()
    split = _folds(240, 4).fold(0)
    script = jnp.asarray([1.0, 5.0, 4.0, 3.0, 2.5, 2.7, 2.6, 2.9], jnp.float32)
    loop = engine.LoopConfig(max_epochs=8, batch_size=32, min_epochs=5, patience=3)
    res = engine.fit(_Linear(5, script=script), loop, jax.random.key(0), data, split)
    assert int(res.n_epochs) == _reference_early_stop(np.asarray(script), 5, 3)[0] == 5
    assert int(res.best_epoch) == 4
    five = engine.fit(_Linear(5), dataclasses.replace(loop, max_epochs=5, patience=None, min_epochs=0),
                      jax.random.key(0), data, split)
    np.testing.assert_array_equal(res.params["w"], five.params["w"])


def test_vmapped_folds_equal_looped_fits_bit_for_bit():
    data, _ = _regression()
    splits = _folds(250, 5)  # unequal fold sizes: padding must not leak into results
    m = _Linear(5)
    loop = engine.LoopConfig(max_epochs=8, batch_size=16, min_epochs=2, patience=2)
    keys = engine.fold_keys(jax.random.key(3), 5)
    together = engine.fit_folds(m, loop, keys, data, splits, mesh=None)
    loop1 = dataclasses.replace(loop, steps_per_epoch=int(np.min(splits.n_train)) // 16)
    for i in range(5):
        alone = engine.fit(m, loop1, keys[i], data, splits.fold(i))
        jax.tree.map(
            lambda a, b: np.testing.assert_array_equal(np.asarray(a[i]), np.asarray(b)), together, alone
        )
    # lax.map with a fold batch (the memory knob) gives the same program results.
    mapped = engine.fit_folds(m, loop, keys, data, splits, mesh=None, batch_size=2)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), together, mapped)


def test_hyperparameter_grid_as_fold_axis():
    data, _ = _regression()
    splits = _folds(240, 3)
    lrs = [0.001, 0.01, 0.1]
    grid = engine.stack_trees([_Linear(5, learning_rate=lr) for lr in lrs])
    loop = engine.LoopConfig(max_epochs=5, batch_size=16, min_epochs=0, patience=None)
    keys = engine.fold_keys(jax.random.key(0), 3)
    res = engine.fit_folds(grid, loop, keys, data, splits, method_batched=True, mesh=None)
    np.testing.assert_allclose(res.learning_rate, lrs, rtol=1e-6)
    final = np.asarray(res.history["val_loss"][:, -1])
    assert final[0] > final[1] > final[2]  # larger steps converge further in 5 epochs


def test_fingerprint_is_of_values_not_objects():
    """A checkpoint's key must be the same in a new process: equal values give equal
    digests, also inside object arrays (whose bytes are element addresses), and a changed
    value, dtype or shape gives another."""
    def ragged(*sizes):
        out = np.empty(len(sizes), dtype=object)
        out[:] = [np.arange(n) for n in sizes]
        return out

    base = engine.fingerprint("m", {"lr": 0.1}, 3, np.ones((2, 3), np.float32), ragged(3, 2))
    assert base == engine.fingerprint("m", {"lr": 0.1}, 3, np.ones((2, 3), np.float32), ragged(3, 2))
    for other in (engine.fingerprint("m", {"lr": 0.1}, 3, np.ones((2, 3), np.float32), ragged(3, 3)),
                  engine.fingerprint("m", {"lr": 0.1}, 3, np.ones((3, 2), np.float32), ragged(3, 2)),
                  engine.fingerprint("m", {"lr": 0.1}, 3, np.ones((2, 3), np.float64), ragged(3, 2)),
                  engine.fingerprint("m", {"lr": 0.2}, 3, np.ones((2, 3), np.float32), ragged(3, 2))):
        assert other != base


def test_checkpointed_fold_axis_equals_the_one_program(tmp_path):
    """A grid on the fold axis run in checkpointed segments of 2 epochs (vmapped, and
    looped in the program): the same results as the uninterrupted program."""
    data, _ = _regression()
    splits = _folds(240, 3)
    grid = engine.stack_trees([_Linear(5, learning_rate=lr) for lr in (0.001, 0.01, 0.1)])
    loop = engine.LoopConfig(max_epochs=5, batch_size=16, min_epochs=1, patience=1)
    keys = engine.fold_keys(jax.random.key(0), 3)
    for bs in (None, 1):
        whole = engine.fit_folds(grid, loop, keys, data, splits, method_batched=True, mesh=None, batch_size=bs)
        seg = engine.fit_folds_checkpointed(grid, loop, keys, data, splits, method_batched=True, mesh=None,
                                            batch_size=bs, path=tmp_path / f"g{bs}.npz", every=2, fingerprint="g")
        jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), seg, whole)


def test_second_fit_with_same_shapes_does_not_retrace():
    data, _ = _regression()
    splits = _folds(240, 3)
    loop = engine.LoopConfig(max_epochs=3, batch_size=16, min_epochs=0, patience=None)
    keys = engine.fold_keys(jax.random.key(0), 3)
    engine.fit_folds(_Linear(5), loop, keys, data, splits, mesh=None)
    before = _Linear.traces[0]
    other = {"x": data["x"] * 2.0, "y": data["y"] + 1.0}
    engine.fit_folds(_Linear(5, learning_rate=0.01), loop, engine.fold_keys(jax.random.key(9), 3), other, splits, mesh=None)
    assert _Linear.traces[0] == before


def test_fit_folds_validates_inputs():
    data, _ = _regression()
    splits = _folds(240, 3)
    loop = engine.LoopConfig(max_epochs=2, batch_size=16, min_epochs=0, patience=None)
    with pytest.raises(ValueError, match="one key per fold"):
        engine.fit_folds(_Linear(5), loop, engine.fold_keys(jax.random.key(0), 2), data, splits, mesh=None)
    with pytest.raises(ValueError, match="batch_size"):
        engine.fit_folds(_Linear(5), engine.LoopConfig(batch_size=1000, min_epochs=0), engine.fold_keys(jax.random.key(0), 3), data, splits)


def _lightning_suggestion(lrs, losses, beta=0.98, skip_begin=10, skip_end=1):
    """Lightning 2.x (_LRCallback + _LRFinder.suggestion), transcribed in numpy: the
    global step it reads is already incremented, and the gradient is w.r.t. the rates."""
    avg, smoothed = 0.0, []
    for i, loss in enumerate(losses):
        global_step = i + 1
        avg = beta * avg + (1 - beta) * loss
        smoothed.append(avg / (1 - beta ** (global_step + 1)))
    curve = np.asarray(smoothed)[skip_begin:-skip_end]
    rates = np.asarray(lrs, np.float64)[skip_begin:-skip_end]
    return rates[np.argmin(np.gradient(curve, rates))]


def _lightning_rates(min_lr, max_lr, n, mode):
    """The learning rate Lightning's _LinearLR / _ExponentialLR give at each step."""
    out = []
    for last_epoch in range(n):
        r = (last_epoch + 1) / n if last_epoch > 0 else 0.0
        out.append(min_lr + r * (max_lr - min_lr) if mode == "linear" else min_lr * (max_lr / min_lr) ** r)
    return np.asarray(out)


@pytest.mark.parametrize("mode", ["exponential", "linear"])
def test_lr_rates_match_lightning_schedulers(mode):
    finder = engine.LRFinder(max_lr=1e-3, n_steps=50, mode=mode)
    np.testing.assert_allclose(np.asarray(finder.rates()), _lightning_rates(1e-8, 1e-3, 50, mode), rtol=1e-5)


def test_lr_suggestion_matches_lightning_rule():
    finder = engine.LRFinder(max_lr=1e-2, n_steps=60)
    lrs = np.asarray(finder.rates())
    rng = np.random.default_rng(0)
    losses = 2.0 - np.tanh((np.log10(lrs) + 4.5) * 2) + 0.02 * rng.normal(size=60)
    got, _ = engine.suggest_lr(finder, jnp.asarray(lrs), jnp.asarray(losses, jnp.float32))
    np.testing.assert_allclose(float(got), _lightning_suggestion(lrs, losses), rtol=1e-5)
    np.testing.assert_allclose(lrs[0], 1e-8, rtol=1e-5)


def test_lr_finder_runs_inside_the_fit():
    data, _ = _regression()
    split = _folds(240, 4).fold(0)
    loop = engine.LoopConfig(max_epochs=5, batch_size=16, min_epochs=0, patience=None,
                             lr_finder=engine.LRFinder(max_lr=0.5, n_steps=40))
    res = engine.fit(_Linear(5, learning_rate=123.0), loop, jax.random.key(0), data, split)
    lr = float(res.learning_rate)
    assert 1e-8 <= lr <= 0.5 and lr != 123.0
    assert np.isfinite(float(res.history["val_loss"][-1]))


# sharded over four CPU devices == one device: tests/test_multidevice.py


def test_chunk_map_equals_direct_and_pads_the_last_chunk():
    x = jnp.arange(23 * 3, dtype=jnp.float32).reshape(23, 3)
    fn = lambda c: {"s": jnp.sum(c, 1), "sq": c * c}  # noqa: E731
    for chunk in (1, 5, 23, 64):
        got = jax.jit(lambda a, c=chunk: engine.chunk_map(fn, a, c))(x)
        np.testing.assert_array_equal(np.asarray(got["s"]), np.asarray(x).sum(1))
        np.testing.assert_array_equal(np.asarray(got["sq"]), np.asarray(x) ** 2)


# --------------------------------------------------------------------------- several datasets


@functools.partial(jax.tree_util.register_dataclass, data_fields=["learning_rate"], meta_fields=[])
@dataclasses.dataclass(frozen=True)
class _TwoData:
    """Reports which cells each step sees (no learning): data is ({"x": ids}, {"x": ids})."""

    learning_rate: float = 0.0

    def init(self, key, data):
        return {"w": jnp.zeros(())}, {}

    def optimizer(self, learning_rate):
        return optax.sgd(learning_rate)

    def epoch_context(self, epoch):
        return {}

    def train_loss(self, params, state, batch, key, ctx):
        a, b = batch[0]["x"], batch[1]["x"]
        metrics = {"sum_a": jnp.sum(a), "sum_b": jnp.sum(b), "n_a": jnp.float32(a.shape[0]),
                   "n_b": jnp.float32(b.shape[0])}
        return params["w"] * 0.0, (state, metrics)

    def eval_loss(self, params, state, batch, weights, ctx):
        (a, b), (wa, wb) = (batch[0]["x"], batch[1]["x"]), weights
        return jnp.sum(wa * a) + jnp.sum(wb * b), {"n_val": jnp.sum(wa) + jnp.sum(wb)}


def test_two_datasets_each_step_takes_both_and_the_smaller_cycles():
    n_a, n_b, bs = 48, 20, 8
    data = ({"x": jnp.arange(n_a, dtype=jnp.float32)}, {"x": 1000.0 + jnp.arange(n_b, dtype=jnp.float32)})
    tr_a, va_a = np.arange(40), np.arange(40, 48)  # 40 training cells: 5 steps of 8
    tr_b, va_b = np.arange(16), np.arange(16, 20)  # 16 training cells: cycled 2.5 times per epoch
    splits = (engine.make_splits([tr_a], [va_a]), engine.make_splits([tr_b], [va_b]))
    loop = engine.LoopConfig(max_epochs=3, batch_size=bs, min_epochs=0, patience=None)
    res = engine.fit_folds(_TwoData(), loop, engine.fold_keys(jax.random.key(0), 1), data, splits, mesh=None)
    h = {k: np.asarray(v)[0] for k, v in res.history.items()}
    # the epoch has as many steps as the larger dataset fills: every A cell once
    np.testing.assert_allclose(h["train_sum_a"] * 5, tr_a.sum())
    np.testing.assert_array_equal(h["train_n_b"], bs)  # full minibatches of the smaller dataset too
    # B's 40 draws in an epoch walk its permutation 2.5 times: 16 + 16 + 8 cells, all training cells
    sums_b = h["train_sum_b"] * 5
    assert np.all(sums_b >= 2 * (1000 * 16 + tr_b.sum()) + 8 * 1000 + np.sort(tr_b)[:8].sum())
    assert np.all(sums_b <= 2 * (1000 * 16 + tr_b.sum()) + 8 * 1000 + np.sort(tr_b)[-8:].sum())
    # validation gets both datasets' validation cells with their weights
    np.testing.assert_allclose(h["val_loss"], va_a.sum() + (1000 * 4 + va_b.sum()))
    np.testing.assert_array_equal(h["val_n_val"], 12)


def test_two_datasets_need_matching_fold_counts_and_large_enough_sets():
    data = ({"x": jnp.arange(20.0)}, {"x": jnp.arange(20.0)})
    one = engine.make_splits([np.arange(16)], [np.arange(16, 20)])
    two = engine.make_splits([np.arange(16)] * 2, [np.arange(16, 20)] * 2)
    loop = engine.LoopConfig(max_epochs=1, batch_size=4, min_epochs=0, patience=None)
    with pytest.raises(ValueError, match="same number of folds"):
        engine.fit_folds(_TwoData(), loop, engine.fold_keys(jax.random.key(0), 1), data, (one, two), mesh=None)
    big = engine.LoopConfig(max_epochs=1, batch_size=17, min_epochs=0, patience=None)
    with pytest.raises(ValueError, match="batch_size"):
        engine.fit_folds(_TwoData(), big, engine.fold_keys(jax.random.key(0), 1), data, (one, one), mesh=None)


def test_resuming_from_checkpoints_equals_one_uninterrupted_fit():
    data, _ = _regression()
    split = _folds(240, 4).fold(0)
    script = jnp.asarray([5.0, 4, 3, 2, 2.5, 1.5, 1.6, 1.7, 1.8, 1, 1, 1], jnp.float32)  # stops after 9 epochs
    method = _Linear(5, script=script)
    loop = engine.LoopConfig(max_epochs=12, batch_size=16, min_epochs=1, patience=3)
    key = jax.random.key(7)
    whole = engine.fit(method, loop, key, data, split)
    ck = jax.jit(engine.start, static_argnames="loop")(method, loop, key, data, split)
    fit = jax.jit(engine.fit_one, static_argnames="loop")
    n_segments, traces = 0, []
    while not bool(engine.checkpoint_done(loop, ck)):
        res = fit(method, loop, key, data, split, resume=ck, stop_after=ck.epoch + 3)
        ck = res.checkpoint
        n_segments += 1
        traces.append(_Linear.traces[0])
    assert n_segments == 3 and int(ck.epoch) == int(whole.n_epochs) == 9  # early-stopped in segment 3
    assert traces[0] == traces[-1]  # every segment ran the same compiled program
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 res._replace(checkpoint=None), whole)

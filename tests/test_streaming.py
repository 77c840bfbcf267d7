"""Streaming: on-disk sources, the streamed fit (one compiled chunk program, same step and
early-stopping rule as the in-memory loop), estimators fitted from .h5ad / .zarr, chunked
inference under a memory budget. Host memory staying bounded is measured by
``benchmarks/bench_scale.py``, not tested here."""

from __future__ import annotations

import sys
from pathlib import Path

import anndata
import chex
import h5py
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.sparse as sp
import sklearn.base
import zarr

import jaxsel
from jaxsel import datasets, engine, streaming
from jaxsel import preprocessing as pp
from jaxsel.engine import stream as engine_stream
from jaxsel.methods import gimvi

sys.path.insert(0, str(Path(__file__).parent))
from test_engine import _Linear, _regression  # noqa: E402

N_CELLS, N_GENES, N_TYPES, PER_TYPE = 3000, 120, 4, 3
MM = dict(n_markers=12, hidden_size=32, max_epochs=6, min_epochs=3, patience=2, learning_rate=2e-3,
          random_state=0, chunk_size=1024)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("stream")
    kw = dict(n_types=N_TYPES, n_markers_per_type=PER_TYPE, chunk_cells=700, random_state=3)
    info = datasets.write_synthetic_counts(d / "cells.h5ad", N_CELLS, N_GENES, **kw)
    datasets.write_synthetic_counts(d / "cells.zarr", N_CELLS, N_GENES, **kw)
    full = anndata.read_h5ad(d / "cells.h5ad")
    return {"dir": d, "h5ad": d / "cells.h5ad", "zarr": d / "cells.zarr", "info": info,
            "counts": full.X.toarray(), "labels": np.asarray(full.obs["cell_type"]),
            "genes": np.asarray(full.var_names)}


# ----------------------------------------------------------------------------- writing and reading


def test_synthetic_counts_on_disk(files):
    a = anndata.read_h5ad(files["h5ad"], backed="r")
    assert a.shape == (N_CELLS, N_GENES) and a.isbacked
    assert a.obs["cell_type"].nunique() == N_TYPES
    planted = np.flatnonzero(a.var["planted_marker"].to_numpy())
    np.testing.assert_array_equal(planted, np.sort(files["info"]["marker_genes"].ravel()))
    z = anndata.read_zarr(files["zarr"])  # same seed and chunking: the same counts
    np.testing.assert_array_equal(z.X.toarray(), files["counts"])
    x = files["counts"]
    assert np.array_equal(x, np.round(x)) and x.min() >= 0 and (x.sum(1) > 0).all()
    with pytest.raises(FileExistsError, match="overwrite"):
        datasets.write_synthetic_counts(files["h5ad"], 10, 20, n_types=2, n_markers_per_type=1)
    with pytest.raises(ValueError, match=r"\.h5ad or \.zarr"):
        datasets.write_synthetic_counts(files["dir"] / "cells.csv", 10, 20, n_types=2, n_markers_per_type=1)


def test_row_sources_agree(files):
    x = files["counts"]
    rows = np.array([0, 1, 2, 70, 71, 500, 2999])
    dense_h5 = files["dir"] / "dense.h5"
    with h5py.File(dense_h5, "w") as f:
        f["X"] = x
    zarr_dense = zarr.open_array(str(files["dir"] / "dense_array.zarr"), mode="w", shape=x.shape, chunks=(256, 64),
                                 dtype="f4")
    zarr_dense[:] = x
    backed = anndata.read_h5ad(files["h5ad"], backed="r")
    with h5py.File(dense_h5, "r") as f:
        for source in (files["h5ad"], str(files["zarr"]), backed, f["X"], zarr_dense, sp.csr_matrix(x), x):
            with streaming.open_source(source) as src:
                assert src.shape == x.shape
                np.testing.assert_array_equal(src.read(5, 905), x[5:905])
                np.testing.assert_array_equal(src.read_rows(rows), x[rows])
    with streaming.open_source(files["zarr"]) as src:
        np.testing.assert_array_equal(src.var_names, files["genes"])
        np.testing.assert_array_equal(src.obs_column("cell_type"), files["labels"])


def test_bad_sources_are_clear_errors(files):
    with pytest.raises(FileNotFoundError, match="no such"):
        streaming.RowSource(files["dir"] / "missing.h5ad")
    with pytest.raises(TypeError, match="backed"):
        streaming.RowSource(anndata.AnnData(np.ones((3, 2), np.float32)))
    with pytest.raises(ValueError, match="CSR"):
        streaming.RowSource(sp.csc_matrix(np.eye(3, dtype=np.float32)))
    with pytest.raises(ValueError, match="2-D"):
        streaming.RowSource(np.ones(5, np.float32))
    with pytest.raises(TypeError, match="cannot stream"):
        streaming.RowSource({"X": 1})
    with streaming.open_source(files["h5ad"]) as src:
        with pytest.raises(ValueError, match="sorted"):
            src.read_rows([3, 1])
        with pytest.raises(KeyError, match="no column"):
            src.obs_column("tissue")
    bad = files["dir"] / "not_hdf5.h5ad"
    bad.write_text("hello")
    with pytest.raises(ValueError, match="HDF5"):
        jaxsel.MarkerMap(**MM).fit(bad, np.zeros(3))
    with pytest.raises(ValueError, match="non-integer"):
        streaming.count_stats(streaming.RowSource(np.full((4, 3), 0.5, np.float32)))
    with pytest.raises(ValueError, match="chunk_size"):
        jaxsel.MarkerMap(**{**MM, "chunk_size": 10}).fit(files["h5ad"], "cell_type")


def test_markermap_recipe_streams_the_paper_preprocessing(files):
    with streaming.markermap_recipe(files["zarr"], block_rows=500) as src:
        got = src.read(0, N_CELLS)
    want, _ = pp.markermap_recipe(files["counts"])
    np.testing.assert_allclose(got, want, atol=1e-5)
    # genes constant after normalisation (here: all equal counts) get SD 1, not rounding noise
    flat = streaming.markermap_recipe(np.full((50, 4), 3.0, np.float32), block_rows=7)
    np.testing.assert_array_equal(flat.gene_std, np.ones(4, np.float32))
    np.testing.assert_array_equal(flat.read(0, 50), np.zeros((50, 4), np.float32))


# ----------------------------------------------------------------------------- the engine


def _stream_linear(method, loop, n=1600, n_val=200, chunk=256, key=0):
    data, _ = _regression(n=n)
    host = {k: np.asarray(v) for k, v in data.items()}
    return engine.fit_stream(method, loop, jax.random.key(key), lambda rows: {k: v[rows] for k, v in host.items()},
                             np.arange(n_val, n), np.arange(n_val), chunk_size=chunk)


def test_stream_engine_trains_and_compiles_the_chunk_program_once():
    loop = engine.LoopConfig(max_epochs=8, batch_size=16, min_epochs=0, patience=None)
    cache = engine_stream._chunk_program._cache_size()
    traces = _Linear.traces[0]
    out = _stream_linear(_Linear(5), loop)
    np.testing.assert_allclose(out.result.params["w"], np.arange(1, 6), atol=2e-2)
    assert int(out.result.n_epochs) == 8 and out.result.history["val_loss"].shape == (8,)
    # 1400 training cells in blocks of 32 -> 44 blocks, 8 per chunk: 6 chunks, 87 steps per epoch
    assert out.info["steps"] == [87] * 8 and out.info["chunks_per_epoch"] == 6
    assert int(out.result.model_state["steps"]) == 8 * 87
    assert engine_stream._chunk_program._cache_size() == cache + 1  # every chunk, every epoch: one program
    first_traces = _Linear.traces[0] - traces
    _stream_linear(_Linear(5), loop, n=2400, key=1)  # more cells, same chunk shape: no new program
    assert engine_stream._chunk_program._cache_size() == cache + 1
    assert _Linear.traces[0] - traces == first_traces


def test_stream_engine_stops_by_the_in_memory_rule():
    # scripted validation losses: the epoch of the best parameters and the stop are the loop's
    script = jnp.asarray([5.0, 4.0, 3.0, 3.5, 2.5, 2.6, 2.7, 2.8, 1.0, 1.0], jnp.float32)
    loop = engine.LoopConfig(max_epochs=10, batch_size=16, min_epochs=2, patience=3)
    method = _Linear(5, script=script)
    out = _stream_linear(method, loop)
    data, _ = _regression(n=1600)
    split = engine.make_splits([np.arange(200, 1600)], [np.arange(200)]).fold(0)
    ref = engine.fit(method, loop, jax.random.key(0), data, split)
    assert int(out.result.n_epochs) == int(ref.n_epochs) == 8
    assert int(out.result.best_epoch) == int(ref.best_epoch) == 4
    np.testing.assert_array_equal(np.isnan(out.result.history["val_loss"]), np.isnan(ref.history["val_loss"]))


def test_stream_engine_runs_the_range_test_on_the_first_chunk():
    finder = engine.LRFinder(max_lr=0.5, min_lr=1e-4, n_steps=40)
    loop = engine.LoopConfig(max_epochs=2, batch_size=16, min_epochs=0, patience=None, lr_finder=finder)
    out = _stream_linear(_Linear(5, learning_rate=-1.0), loop)  # the rate given is never used
    lr = float(out.result.learning_rate)
    assert 1e-4 < lr <= 0.5 and np.isfinite(out.result.history["val_loss"]).all()
    assert float(out.result.history["val_loss"][-1]) < float(out.result.history["val_loss"][0])


def test_stream_engine_checkpoint_resumes_bit_for_bit(tmp_path):
    """Killed after epoch 4 (a checkpoint every 3 epochs and at the end), run again with
    the same path: it goes on from epoch 3 and ends with the uninterrupted fit's result,
    bit for bit; a finished file returns that result without reading the data; a file
    from other data or settings is refused."""
    loop = engine.LoopConfig(max_epochs=7, batch_size=16, min_epochs=0, patience=None)
    data, _ = _regression(n=1600)
    host = {k: np.asarray(v) for k, v in data.items()}
    read = lambda rows: {k: v[rows] for k, v in host.items()}  # noqa: E731
    tr, va = np.arange(200, 1600), np.arange(200)
    run = lambda **kw: engine.fit_stream(_Linear(5), loop, jax.random.key(0), read, tr, va,  # noqa: E731
                                         chunk_size=256, **kw)
    plain = run()
    path = tmp_path / "stream.npz"

    def kill(epoch, metrics):
        if epoch == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(checkpoint=path, checkpoint_every=3, callback=kill)
    epochs = []
    resumed = run(checkpoint=path, checkpoint_every=3, callback=lambda e, m: epochs.append(e))
    assert epochs == [3, 4, 5, 6] and resumed.info["first_epoch"] == 3
    for a, b in zip(jax.tree.leaves(plain.result), jax.tree.leaves(resumed.result)):
        np.testing.assert_array_equal(a, b)

    def no_read(rows):
        assert rows.shape[0] == va.shape[0], "a finished fit reads only the validation rows"
        return read(rows)

    done = engine.fit_stream(_Linear(5), loop, jax.random.key(0), no_read, tr, va, chunk_size=256,
                             checkpoint=path)
    assert done.info["epoch_seconds"] == []
    for a, b in zip(jax.tree.leaves(plain.result), jax.tree.leaves(done.result)):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="other settings or other data"):
        engine.fit_stream(_Linear(5), loop, jax.random.key(0), read, tr[1:], va, chunk_size=256, checkpoint=path)
    with pytest.raises(ValueError, match="other settings or other data"):
        run(checkpoint=path, fingerprint="seed 1")
    with pytest.raises(TypeError, match="checkpoint must be a file path"):
        run(checkpoint=3)
    with pytest.raises(TypeError, match="checkpoint_every"):
        run(checkpoint=path, checkpoint_every=2.5)


# ----------------------------------------------------------------------------- estimators


@pytest.fixture(scope="module")
def streamed(files):
    with streaming.markermap_recipe(files["h5ad"]) as src:
        sel = jaxsel.MarkerMap(**MM).fit(src, "cell_type")
        x = src.read(0, N_CELLS)
    return sel, x


def test_markermap_streamed_from_disk_finds_the_planted_markers(files, streamed):
    sel, x = streamed
    planted = set(files["info"]["marker_genes"].ravel().tolist())
    assert len(planted & set(sel.markers_.tolist())) >= 0.9 * len(planted)
    assert sel.stream_info_["chunks_per_epoch"] == 3 and sel.n_features_in_ == N_GENES
    # as good as the in-memory fit on such data (tests/test_estimators.py), not the same
    # numbers: minibatches are shuffled within chunks
    assert sel.history_["val_accuracy"].max() > 0.95
    # the same algorithm from a zarr store: the same fit, bit for bit
    with streaming.markermap_recipe(files["zarr"]) as src:
        again = jaxsel.MarkerMap(**MM).fit(src, "cell_type")
    np.testing.assert_array_equal(again.markers_, sel.markers_)
    np.testing.assert_array_equal(again.history_["val_loss"], sel.history_["val_loss"])


def _die_after_first_checkpoint(monkeypatch, where=lambda path: True):
    """Make the streamed loop crash right after it writes its first checkpoint (to a
    path for which ``where(path)`` holds)."""
    real = engine_stream.write_checkpoint

    def write_then_die(path, *args, **kw):
        real(path, *args, **kw)
        if not where(path):
            return
        monkeypatch.setattr(engine_stream, "write_checkpoint", real)
        raise KeyboardInterrupt

    monkeypatch.setattr(engine_stream, "write_checkpoint", write_then_die)


def test_markermap_streamed_fit_resumes_from_a_checkpoint(files, streamed, tmp_path, monkeypatch):
    sel, _ = streamed
    path = tmp_path / "markermap.npz"
    _die_after_first_checkpoint(monkeypatch)
    with streaming.markermap_recipe(files["h5ad"]) as src:
        with pytest.raises(KeyboardInterrupt):
            jaxsel.MarkerMap(**MM).fit(src, "cell_type", checkpoint=path, checkpoint_every=2)
        again = jaxsel.MarkerMap(**MM).fit(src, "cell_type", checkpoint=path, checkpoint_every=2)
        assert again.stream_info_["first_epoch"] == 2  # went on after the 2 epochs on file
        np.testing.assert_array_equal(again.markers_, sel.markers_)
        np.testing.assert_array_equal(again.scores_, sel.scores_)
        for k in sel.history_:
            np.testing.assert_array_equal(again.history_[k], sel.history_[k])
        with pytest.raises(ValueError, match="other settings or other data"):
            jaxsel.MarkerMap(**{**MM, "random_state": 1}).fit(src, "cell_type", checkpoint=path)
    # the same file through another recipe (other gene statistics): not this fit's checkpoint
    with streaming.markermap_recipe(files["h5ad"], target_sum=1e3) as other:
        with pytest.raises(ValueError, match="other settings or other data"):
            jaxsel.MarkerMap(**MM).fit(other, "cell_type", checkpoint=path)


def test_markermap_cross_validates_data_on_disk_fold_by_fold(files, streamed, tmp_path, monkeypatch):
    """cross_validate of an on-disk X: the in-memory folds, one streamed fit each; the
    planted markers in every fold; the classifiers' scores those of the same markers
    on the matrix in memory (only the markers' columns are read); killed in fold 1 and
    run again, fold 0 is read back and the result is the uninterrupted run's."""
    _, x = streamed
    kw = {**MM, "max_epochs": 4, "min_epochs": 2}
    codes = np.unique(files["labels"], return_inverse=True)[1]
    with streaming.markermap_recipe(files["h5ad"]) as src:
        out = jaxsel.MarkerMap(**kw).cross_validate(src, "cell_type", n_folds=3, classifiers=("knn",))
        assert out["markers"].shape == (3, 12) and out["history"]["val_loss"].shape == (3, 4)
        assert len(out["stream_info"]) == 3 and out["stream_info"][2]["first_epoch"] == 0
        planted = set(files["info"]["marker_genes"].ravel().tolist())
        for m in out["markers"]:
            assert len(planted & set(m.tolist())) >= 0.8 * len(planted)
        folds = pp.kfold_indices(codes, 3, random_state=0, stratify=True, validation_fraction=0.1)
        for i, (tr, _, te) in enumerate(folds):
            np.testing.assert_array_equal(out["test_indices"][i], te)
            ref = jaxsel.metrics.classification_scores(x[tr], codes[tr], x[te], codes[te], out["markers"][i], "knn")
            assert out["classification"]["knn"]["accuracy"][i] == ref["accuracy"] > 0.9
        ck = tmp_path / "cv.npz"
        _die_after_first_checkpoint(monkeypatch, lambda path: "fold1" in str(path))
        with pytest.raises(KeyboardInterrupt):
            jaxsel.MarkerMap(**kw).cross_validate(src, "cell_type", n_folds=3, classifiers=("knn",), checkpoint=ck,
                                                  checkpoint_every=2)
        assert sorted(p.name for p in tmp_path.glob("cv.*")) == ["cv.fold0.npz", "cv.fold1.npz"]
        again = jaxsel.MarkerMap(**kw).cross_validate(src, "cell_type", n_folds=3, classifiers=("knn",),
                                                      checkpoint=ck, checkpoint_every=2)
        assert again["stream_info"][0]["epoch_seconds"] == [] and again["stream_info"][1]["first_epoch"] == 2
        for key in ("markers", "scores", "n_epochs", "best_epoch"):
            np.testing.assert_array_equal(again[key], out[key])
        for key in out["history"]:
            np.testing.assert_array_equal(again["history"][key], out["history"][key])
        with pytest.raises(ValueError, match="chunk_size=16 must be at least batch_size=64"):
            jaxsel.MarkerMap(**{**kw, "chunk_size": 16}).cross_validate(src, "cell_type", n_folds=3)
        with pytest.raises(ValueError, match=r"n_folds must be in \[2, n_cells=3000\], got 3001"):
            jaxsel.MarkerMap(**kw).cross_validate(src, "cell_type", n_folds=3001)
        # refused before any training: batch_size (unused on disk) and the classifiers
        with pytest.raises(ValueError, match="batch_size must be a positive int, None or 'auto'"):
            jaxsel.MarkerMap(**kw).cross_validate(src, "cell_type", n_folds=3, batch_size="x")
        with pytest.raises(ValueError, match="classifier must be 'knn', 'rf'"):
            jaxsel.MarkerMap(**kw).cross_validate(src, "cell_type", n_folds=3, classifiers=("svm",))


def test_markermap_chunked_inference_equals_unchunked(files, streamed):
    sel, x = streamed
    with streaming.markermap_recipe(files["h5ad"]) as src:
        whole = {m: getattr(sel, m)(x) for m in ("decision_function", "embed", "transform")}
        for m in whole:  # on disk, same default budget: the same programs on the same blocks
            np.testing.assert_array_equal(getattr(sel, m)(src), whole[m])
        sel.memory_budget = 4 * N_GENES * 700  # 700 cells per chunk: 5 chunks, the last padded
        try:
            for m in whole:
                np.testing.assert_array_equal(getattr(sel, m)(src), whole[m])
                np.testing.assert_array_equal(getattr(sel, m)(x), whole[m])
            np.testing.assert_array_equal(sel.embed(sp.csr_matrix(x)), whole["embed"])
        finally:
            sel.memory_budget = streaming.DEFAULT_MEMORY_BUDGET
    assert (sel.predict(x) == files["labels"]).mean() > 0.95


def test_gimvi_streams_the_reference_and_imputes_within_a_budget(files, tmp_path, monkeypatch):
    genes = files["genes"]
    panel = genes[np.sort(np.random.default_rng(0).choice(N_GENES, 30, replace=False))]
    xs = anndata.read_h5ad(files["h5ad"])[:400, panel].X.toarray()
    # a small model (compilation is the cost here): the streaming mechanics are the same
    model = jaxsel.GimVI(hidden=16, n_latent=4, n_layers_shared=0, dropout=0.0, seq_likelihood="nb",
                         dispersion="gene", adversarial=False, max_epochs=3, chunk_size=1024, random_state=0)
    backed = anndata.read_h5ad(files["h5ad"], backed="r")
    model.fit(backed, xs, ref_genes=genes, spatial_genes=panel)
    assert model.history_["val_loss"].shape == (3,) and np.isfinite(model.history_["val_loss"]).all()
    assert model.stream_info_["cells"][0] >= 0.85 * 0.9 * N_CELLS  # one pass over the reference
    # killed after its first epoch's checkpoint and run again: the uninterrupted fit, bit for bit
    resumed = sklearn.base.clone(model)
    path = tmp_path / "gimvi.npz"
    _die_after_first_checkpoint(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        resumed.fit(backed, xs, ref_genes=genes, spatial_genes=panel, checkpoint=path, checkpoint_every=1)
    resumed.fit(backed, xs, ref_genes=genes, spatial_genes=panel, checkpoint=path, checkpoint_every=1)
    assert resumed.stream_info_["first_epoch"] == 1
    for a, b in zip(jax.tree.leaves((model.params_, model.state_, model.history_)),
                    jax.tree.leaves((resumed.params_, resumed.state_, resumed.history_))):
        np.testing.assert_array_equal(a, b)
    # a budget of 50 cells x 24 decoded [cells, genes] arrays: blocks of 200 cells decoded 50 at
    # a time, and only the requested genes kept; the same numbers as one call on all cells
    model.memory_budget = 4 * N_GENES * 24 * 50
    assert model._impute_rows(400) == (50, 200)
    mean, var = model.impute(n_samples=2)
    assert mean.shape == (400, N_GENES - 30) and (var >= 0).all() and np.isfinite(mean).all()
    model.memory_budget, model.chunk = None, 50
    one = model.impute(n_samples=2)
    np.testing.assert_array_equal(mean, one[0])
    np.testing.assert_array_equal(var, one[1])
    z_disk = model.latent(files["zarr"], modality="reference")
    np.testing.assert_array_equal(z_disk, model.latent(files["counts"], modality="reference"))
    with pytest.raises(ValueError, match="pass X"):
        model.latent(modality="reference")


def test_gimvi_gene_cross_validation_streams_the_reference(files, tmp_path, monkeypatch):
    """cross_validate_genes with the reference on disk: one streamed fit per model; the
    held-out genes imputed (finite) and only they scored; the reference latents read
    block by block equal those of the counts in memory; killed in the second model and
    run again, the first is read back and the results equal the uninterrupted run's."""
    genes = files["genes"]
    panel = genes[np.sort(np.random.default_rng(0).choice(N_GENES, 30, replace=False))]
    xs = anndata.read_h5ad(files["h5ad"])[:400, panel].X.toarray()
    xs0 = xs.copy()
    folds = [panel[:3].tolist(), panel[3:6].tolist()]
    model = jaxsel.GimVI(hidden=16, n_latent=4, n_layers_shared=0, dropout=0.0, seq_likelihood="nb",
                         dispersion="gene", adversarial=False, max_epochs=2, chunk_size=1024, random_state=0)
    backed = anndata.read_h5ad(files["h5ad"], backed="r")
    seen, real = [], gimvi.latent

    def spy(cfg, p, st, mod, x, mode, **kw):  # the last reference model's parameters
        if mode == 0:
            seen[:] = [(cfg, p, st, mod)]
        return real(cfg, p, st, mod, x, mode, **kw)

    monkeypatch.setattr(gimvi, "latent", spy)
    (res,) = model.cross_validate_genes(backed, xs, ref_genes=genes, spatial_genes=panel, gene_folds=folds)
    monkeypatch.undo()
    np.testing.assert_array_equal(xs, xs0)
    np.testing.assert_array_equal(res.fold_of_gene, [0] * 3 + [1] * 3 + [-1] * 24)
    assert np.isfinite(res.imputed[:, :6]).all() and np.isnan(res.imputed[:, 6:]).all()
    assert np.isfinite(res.pcc[:6]).all() and np.isnan(res.pcc[6:]).all()
    assert res.history["val_loss"].shape == (2, 2) and len(res.stream_info) == 2
    assert not hasattr(model, "params_") and not hasattr(model, "stream_info_")  # the estimator is not fitted
    # the reference latents, read in blocks, are those of the counts in memory
    ref_z, sp_z = res.latent[1]
    assert ref_z.shape == (N_CELLS, 4) and sp_z.shape == (400, 4)
    np.testing.assert_allclose(ref_z, real(*seen[0], jnp.asarray(files["counts"]), 0), rtol=1e-5, atol=1e-5)
    ck = tmp_path / "gcv.npz"
    _die_after_first_checkpoint(monkeypatch, lambda path: "model1" in str(path))
    with pytest.raises(KeyboardInterrupt):
        model.cross_validate_genes(backed, xs, ref_genes=genes, spatial_genes=panel, gene_folds=folds,
                                   checkpoint=ck, checkpoint_every=1)
    # run again with the spatial panel on disk too (read into memory): the same numbers
    anndata.AnnData(X=sp.csr_matrix(xs)).write_h5ad(tmp_path / "panel.h5ad")
    (again,) = model.cross_validate_genes(backed, tmp_path / "panel.h5ad", ref_genes=genes, spatial_genes=panel,
                                          gene_folds=folds, checkpoint=ck, checkpoint_every=1)
    assert again.stream_info[0]["epoch_seconds"] == [] and again.stream_info[1]["first_epoch"] == 1
    for a, b in zip(jax.tree.leaves((res.imputed, res.pcc, res.history, res.latent)),
                    jax.tree.leaves((again.imputed, again.pcc, again.history, again.latent))):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="holds out every spatial gene"):
        model.cross_validate_genes(backed, xs, ref_genes=genes, spatial_genes=panel, gene_folds=[panel.tolist()])
    bad = xs.copy()
    bad[7, 2] = 0.5
    anndata.AnnData(X=bad).write_h5ad(tmp_path / "bad_panel.h5ad")
    with pytest.raises(ValueError, match="X_spatial must hold integer-valued counts"):
        model.cross_validate_genes(backed, tmp_path / "bad_panel.h5ad", ref_genes=genes, spatial_genes=panel)


def test_sparse_bottleneck_streams_x_and_recovers_the_planted_genes(tmp_path, monkeypatch):
    """X on disk (a dense .h5ad opened backed), Y in memory: every stage trains chunk by
    chunk (4 chunks of 128 cells), pre-training included; the planted genes come out, and
    inference on disk gives the in-memory numbers."""
    x, y, info = datasets.make_paired(n_cells=480, n_genes=40, n_outputs=5, n_informative=4, random_state=1)
    path = tmp_path / "paired.h5ad"
    anndata.AnnData(X=x, obsm={"Y": y}).write_h5ad(path)
    a = anndata.read_h5ad(path, backed="r")
    x0, y0 = x.copy(), y.copy()
    est = jaxsel.SparseBottleneck(n_genes=4, hidden=(32, 16), learning_rate=3e-3, lasso=0.03, n_clusters=4,
                                  epochs={"pretrain": 3, "frozen": 3, "unfrozen": 25, "finetune": 6, "ae": 2},
                                  chunk_size=128, random_state=0)
    est.fit(a.X, y)
    np.testing.assert_array_equal(y, y0)
    np.testing.assert_array_equal(np.sort(est.genes_), info["informative_genes"])
    assert set(est.stream_info_) == {"pretrain", "frozen", "unfrozen", "finetune", "ae"}
    assert est.stream_info_["unfrozen"]["chunks_per_epoch"] == 4 and est.n_features_in_ == 40
    np.testing.assert_allclose(est.result_.x_mean, x.mean(0), atol=1e-6)
    assert est.history_["test_r2"].shape == (34,) and np.isfinite(est.history_["test_r2"]).all()
    assert est.score(x, y) > 0.5
    np.testing.assert_allclose(est.score(a.X, y), est.score(x, y), rtol=1e-5)
    for m in ("predict", "latent", "reconstruct_genes"):
        np.testing.assert_allclose(getattr(est, m)(a.X), getattr(est, m)(x0), rtol=1e-5, atol=1e-5)
    # checkpointed: one file per stage; killed in the middle of the third stage (after its
    # first write) and run again, the finished stages are read back and the result is the
    # uninterrupted streamed fit's, bit for bit
    ck = tmp_path / "ck.npz"
    resumed = sklearn.base.clone(est)
    _die_after_first_checkpoint(monkeypatch, lambda path: "unfrozen" in str(path))
    with pytest.raises(KeyboardInterrupt):
        resumed.fit(a.X, y, checkpoint=ck, checkpoint_every=4)
    assert sorted(p.name for p in tmp_path.glob("ck.*.npz")) == ["ck.frozen.npz", "ck.pretrain.npz",
                                                                  "ck.unfrozen.npz"]
    resumed.fit(a.X, y, checkpoint=ck, checkpoint_every=4)
    assert resumed.stream_info_["unfrozen"]["first_epoch"] == 4 and resumed.stream_info_["finetune"]["first_epoch"] == 0
    assert resumed.stream_info_["frozen"]["epoch_seconds"] == []  # read back, not trained again
    for u, r in zip(jax.tree.leaves((est.result_, est.history_)), jax.tree.leaves((resumed.result_, resumed.history_))):
        np.testing.assert_array_equal(u, r)
    other = sklearn.base.clone(est).set_params(lasso=0.05)
    with pytest.raises(ValueError, match="belongs to a fit with other settings or other data"):
        other.fit(a.X, y, checkpoint=ck)
    with pytest.raises(TypeError, match="checkpoint_every"):
        sklearn.base.clone(est).fit(a.X, y, checkpoint=tmp_path / "x.npz", checkpoint_every=2.5)
    # bad input is refused before any training, by name
    with pytest.raises(ValueError, match="chunk_size=16 must be at least batch_size=32"):
        jaxsel.SparseBottleneck(chunk_size=16).fit(a.X, y)
    with pytest.raises(TypeError, match="chunk_size"):
        jaxsel.SparseBottleneck(chunk_size=128.5).fit(a.X, y)
    with pytest.raises(ValueError, match="X and Y must have the same number of cells, got 480 and 479"):
        jaxsel.SparseBottleneck(chunk_size=128).fit(a.X, y[:-1])
    bad = x.copy()
    bad[300, 2] = np.nan
    anndata.AnnData(X=bad).write_h5ad(tmp_path / "nan.h5ad")
    with pytest.raises(ValueError, match=r"NaN or infinite values \(in rows 256\.\.383\)"):
        jaxsel.SparseBottleneck(chunk_size=128).fit(tmp_path / "nan.h5ad", y)
    anndata.AnnData(X=x[:, :30]).write_h5ad(tmp_path / "narrow.h5ad")
    with pytest.raises(ValueError, match="X has 30 features, but SparseBottleneck is expecting 40"):
        est.predict(tmp_path / "narrow.h5ad")
    jaxsel.tl.sparse_bottleneck(a, "Y", 4, hidden=(32, 16), learning_rate=3e-3, lasso=0.03, n_clusters=4,
                                epochs={"pretrain": 2, "frozen": 2, "unfrozen": 4, "finetune": 2, "ae": 0},
                                chunk_size=128, random_state=0)
    assert a.isbacked and a.var["sparse_bottleneck"].sum() == 4 and a.obsm["X_sparse_bottleneck"].shape == (480, 2)


def test_column_means_leaving_out_each_group_in_one_pass():
    """``exclude``: every fold's training mean (all rows but the fold's) from one pass,
    rows in no group (-1) always counted; the numpy means of the same rows."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(103, 7)).astype(np.float32) * 10 + 3
    groups = rng.integers(-1, 4, size=103)
    src = streaming.RowSource(x)
    got = streaming.column_means(src, block_rows=16, exclude=groups)
    assert got.shape == (4, 7)
    for g in range(4):
        np.testing.assert_allclose(got[g], x[groups != g].mean(0, dtype=np.float64), rtol=1e-6)
    np.testing.assert_allclose(streaming.column_means(src, block_rows=16), x.mean(0, dtype=np.float64), rtol=1e-6)
    with pytest.raises(ValueError, match=r"exclude must have one label per row \(103\), got shape \(5,\)"):
        streaming.column_means(src, exclude=np.zeros(5, int))
    with pytest.raises(ValueError, match="exclude must hold integer group labels >= -1, got dtype float64"):
        streaming.column_means(src, exclude=groups + 0.5)
    with pytest.raises(ValueError, match="exclude must hold integer group labels >= -1, got dtype int64 and -2"):
        streaming.column_means(src, exclude=np.where(groups == 0, -2, groups))


def test_paired_moments_give_every_folds_scatter_and_r2_in_one_pass():
    """Per-group moments of ``[x, y]`` from one pass: each fold's training mean, the
    scatter about any centre, rows whose grams are that scatter, and R^2 of a linear
    prediction without the rows; the numpy (float64) values of the same rows."""
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(157, 6)) * 3 + 50).astype(np.float32)  # far from 0: centring must not cancel
    y = x[:, :2] @ rng.normal(size=(2, 3)) + rng.normal(size=(157, 3))
    groups = rng.integers(-1, 4, size=157)
    z = np.concatenate([x.astype(np.float64), y], axis=1)
    mom = streaming.paired_moments(streaming.RowSource(x), y, groups=groups, block_rows=20)
    np.testing.assert_array_equal(mom.n, np.bincount(groups[groups >= 0]))
    for g in range(4):
        train = np.arange(4) != g
        rows = z[(groups != g) & (groups >= 0)]
        m = mom.mean(train)
        np.testing.assert_allclose(m, rows.mean(0), rtol=1e-12)
        s = mom.scatter_about(train, m)
        np.testing.assert_allclose(s, (rows - m).T @ (rows - m), rtol=1e-9, atol=1e-9)
        xr, yr = streaming.square_root_rows(s, 6)
        assert xr.shape == (9, 6) and yr.shape == (9, 3)
        c = (rows - m)
        np.testing.assert_allclose(xr.T.astype(np.float64) @ yr, c[:, :6].T @ c[:, 6:], rtol=1e-5, atol=1e-3)
        np.testing.assert_allclose(xr.T.astype(np.float64) @ xr, c[:, :6].T @ c[:, :6], rtol=1e-5, atol=1e-3)
        # R^2 of a prediction of the held-out group, centred with the training mean
        b = rng.normal(size=(6, 3)) * 0.1
        test = z[groups == g] - m
        pred = test[:, :6] @ b
        s_test = mom.scatter_about(np.arange(4) == g, m)
        np.testing.assert_allclose(streaming.linear_r2(s_test, b, 6),
                                   jaxsel.metrics.r2_score(test[:, 6:], pred), rtol=1e-9)
        np.testing.assert_allclose(streaming.linear_r2(s_test, b, 6, per_feature=True),
                                   jaxsel.metrics.r2_score(test[:, 6:], pred, per_feature=True), rtol=1e-9)
    whole = streaming.paired_moments(streaming.RowSource(x), y, block_rows=1000)
    np.testing.assert_allclose(whole.mean([True]), z.mean(0), rtol=1e-12)
    with pytest.raises(ValueError, match=r"y must be \[n_obs=157, n_outputs\], got shape \(156, 3\)"):
        streaming.paired_moments(streaming.RowSource(x), y[1:])
    with pytest.raises(ValueError, match="groups must hold integer group labels"):
        streaming.paired_moments(streaming.RowSource(x), y, groups=groups * 0.5)
    bad = x.copy()
    bad[100, 2] = np.nan
    with pytest.raises(ValueError, match=r"X contains NaN or infinite values \(in rows 100..119\)"):
        streaming.paired_moments(streaming.RowSource(bad), y, block_rows=20)


def test_sparse_rrr_fits_and_cross_validates_x_on_disk(tmp_path):
    """sRRR of an on-disk X from one pass of moments: the planted genes, the in-memory
    fit's coefficients and predictions to float32 precision; cross-validation with the
    in-memory folds, the same genes and R^2 to 1e-5; all folds in one program whose
    looped folds equal each fold fitted alone, bit for bit; bad input by name."""
    from jaxsel.methods import srrr

    x, y, info = datasets.make_paired(n_cells=900, n_genes=50, n_outputs=6, n_informative=4, random_state=3)
    path = tmp_path / "paired.h5ad"
    anndata.AnnData(X=sp.csr_matrix(x)).write_h5ad(path)
    a = anndata.read_h5ad(path, backed="r")
    x0, y0 = x.copy(), y.copy()
    mem = jaxsel.SparseRRR(rank=2, n_genes=4).fit(x, y)
    disk = jaxsel.SparseRRR(rank=2, n_genes=4, chunk_size=256).fit(a.X, y)
    np.testing.assert_array_equal(y, y0)
    np.testing.assert_array_equal(np.sort(disk.genes_), info["informative_genes"])
    np.testing.assert_array_equal(disk.genes_, mem.genes_)
    assert disk.n_features_in_ == 50 and not hasattr(disk, "feature_names_in_")
    np.testing.assert_allclose(disk.lambda_, mem.lambda_, rtol=1e-5)
    np.testing.assert_allclose(disk.coef_w_, mem.coef_w_, atol=2e-5)
    np.testing.assert_allclose(disk.x_mean_, mem.x_mean_, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(disk.predict(path), mem.predict(x), atol=2e-5)  # predict reads the file too
    np.testing.assert_allclose(disk.latent(a.X), mem.latent(x), atol=2e-5)
    np.testing.assert_allclose(disk.score(a.X, y), mem.score(x, y), atol=1e-5)

    cv_mem = jaxsel.SparseRRR(rank=2, n_genes=4).cross_validate(x, y, n_folds=4)
    cv = jaxsel.SparseRRR(rank=2, n_genes=4, chunk_size=256).cross_validate(a.X, y, n_folds=4)
    for i in range(4):
        np.testing.assert_array_equal(cv["test_indices"][i], cv_mem["test_indices"][i])
    np.testing.assert_array_equal(cv["genes"], cv_mem["genes"])
    for k in ("test_r2", "train_r2", "test_r2_per_feature"):
        np.testing.assert_allclose(cv[k], cv_mem[k], atol=1e-5)
    np.testing.assert_allclose(cv["lambda"], cv_mem["lambda"], rtol=1e-5)
    assert (cv["test_r2"] > 0.3).all() and cv["stream_info"]["n_cells"] == 900
    assert disk.stream_info_["rows"] == 56 and disk.stream_info_["n_cells"] == 900
    np.testing.assert_array_equal(x, x0)

    # the fold program (looped) against each fold's rows fitted alone
    rng = np.random.default_rng(0)
    xs = rng.normal(size=(3, 12, 8)).astype(np.float32)
    ys = (xs[:, :, :2] @ rng.normal(size=(2, 3)) + 0.1 * rng.normal(size=(3, 12, 3))).astype(np.float32)
    ns = np.array([40.0, 55.0, 70.0], np.float32)
    folds = jax.device_get(srrr.fit_n_genes_folds(xs, ys, ns, 3, 2, batch_size=1, mesh=None))
    for i in range(3):
        alone = jax.device_get(srrr.fit_n_genes(xs[i], ys[i], 3, 2, n_cells=float(ns[i])))
        for got, want in zip(jax.tree.leaves(folds), jax.tree.leaves(alone)):
            np.testing.assert_array_equal(np.asarray(got)[i], want)
    with pytest.raises(ValueError, match="n_cells must be a number >= 1"):
        srrr.fit_n_genes(xs[0], ys[0], 3, 2, n_cells=0)
    with pytest.raises(ValueError, match="must agree"):
        srrr.fit_n_genes_folds(xs, ys, ns[:2], 3, 2)

    with pytest.raises(ValueError, match="X and Y must have the same number of cells, got 900 and 899"):
        jaxsel.SparseRRR(n_genes=4).fit(a.X, y[:-1])
    with pytest.raises(ValueError, match="n_genes"):
        jaxsel.SparseRRR(n_genes=51).cross_validate(a.X, y, n_folds=4)
    with pytest.raises(ValueError, match="n_folds must be an int >= 2, got 1"):
        jaxsel.SparseRRR(n_genes=4).cross_validate(a.X, y, n_folds=1)
    with pytest.raises(ValueError, match="chunk_size"):
        jaxsel.SparseRRR(n_genes=4, chunk_size=0).fit(a.X, y)
    with pytest.raises(ValueError, match="X has 49 features, but SparseRRR is expecting 50"):
        disk.predict(streaming.RowSource(x[:, 1:]))
    bad = x.copy()
    bad[300, 7] = np.inf
    with pytest.raises(ValueError, match=r"X contains NaN or infinite values \(in rows 256..511\)"):
        jaxsel.SparseRRR(n_genes=4, chunk_size=256).fit(streaming.RowSource(bad), y)
    assert not hasattr(disk.fit(x, y), "stream_info_")  # refitted in memory: no stale stream record



class _Reads(streaming.RowSource):
    """A source that counts its block reads and fails (as a killed job would stop) once
    ``fail_after`` of them have been served."""

    def __init__(self, x, fail_after=None):
        super().__init__(x)
        self.reads, self.fail_after = 0, fail_after

    def _raw(self, start, stop):
        if self.fail_after is not None and self.reads >= self.fail_after:
            raise RuntimeError("killed")
        self.reads += 1
        return super()._raw(start, stop)


def test_sparse_rrr_pass_resumes_from_its_checkpoint_bit_for_bit(tmp_path):
    """A pass killed midway and run again goes on from its last written block: the same
    moments and the same CV results bit for bit as a pass that never stopped, reading
    only the blocks left; a finished file reads no cells (refits with other settings
    reuse it); a file of other inputs, or a checkpoint with X in memory, is an error."""
    x, y, _ = datasets.make_paired(n_cells=900, n_genes=50, n_outputs=6, n_informative=4, random_state=5)
    est = jaxsel.SparseRRR(rank=2, n_genes=4, chunk_size=128)  # 8 blocks, the last of 4 cells
    want = est.cross_validate(_Reads(x), y, n_folds=4)

    ck = tmp_path / "cv.npz"
    with pytest.raises(RuntimeError, match="killed"):
        est.cross_validate(_Reads(x, fail_after=5), y, n_folds=4, checkpoint=ck, checkpoint_every=2)
    src = _Reads(x)
    got = est.cross_validate(src, y, n_folds=4, checkpoint=ck, checkpoint_every=2)
    assert src.reads == 4  # blocks 5..8: the file held the sums of blocks 1..4
    assert 0 < got["stream_info"]["checkpoint_seconds"] < got["stream_info"]["moments_seconds"]
    assert got["stream_info"]["first_row"] == 512
    assert "checkpoint_seconds" not in want["stream_info"]
    for k in ("test_r2", "train_r2", "test_r2_per_feature", "genes", "lambda"):
        np.testing.assert_array_equal(got[k], want[k])
    done = est.cross_validate(_Reads(x, fail_after=0), y, n_folds=4, checkpoint=ck)  # reads nothing
    np.testing.assert_array_equal(done["test_r2"], want["test_r2"])

    # the moments themselves, resumed, against one uninterrupted pass
    folds = np.arange(900) % 3
    plain = streaming.paired_moments(_Reads(x), y, groups=folds, block_rows=100)
    mck = tmp_path / "moments.npz"
    with pytest.raises(RuntimeError, match="killed"):
        streaming.paired_moments(_Reads(x, fail_after=4), y, groups=folds, block_rows=100, checkpoint=mck,
                                 checkpoint_every=3)
    resumed = streaming.paired_moments(_Reads(x), y, groups=folds, block_rows=100, checkpoint=mck)
    for a in ("n", "sums", "scatter", "shift"):
        np.testing.assert_array_equal(getattr(resumed, a), getattr(plain, a))
    recipe = streaming.markermap_recipe(streaming.RowSource(np.abs(x)))  # same shape, another transform
    with pytest.raises(ValueError, match="other settings or other data"):
        streaming.paired_moments(recipe, y, groups=folds, block_rows=100, checkpoint=mck)

    # a finished fit's file serves a refit with other settings without reading X
    fck = tmp_path / "fit.npz"
    jaxsel.SparseRRR(rank=2, n_genes=4, chunk_size=128).fit(_Reads(x), y, checkpoint=fck)
    six = jaxsel.SparseRRR(rank=2, n_genes=6, chunk_size=128).fit(_Reads(x, fail_after=0), y, checkpoint=fck)
    np.testing.assert_array_equal(six.coef_w_, jaxsel.SparseRRR(rank=2, n_genes=6, chunk_size=128)
                                  .fit(_Reads(x), y).coef_w_)

    with pytest.raises(ValueError, match="other settings or other data"):
        est.fit(_Reads(x), y, checkpoint=ck)  # the CV's file: other groups
    with pytest.raises(ValueError, match="other settings or other data"):
        est.fit(_Reads(x), y[::-1], checkpoint=fck)
    with pytest.raises(ValueError, match="other settings or other data"):
        jaxsel.SparseRRR(rank=2, n_genes=4, chunk_size=64).fit(_Reads(x), y, checkpoint=fck)
    with pytest.raises(ValueError, match="no pass to resume"):
        est.fit(x, y, checkpoint=fck)
    with pytest.raises(ValueError, match="no pass to resume"):
        est.cross_validate(x, y, n_folds=4, checkpoint=ck)
    with pytest.raises(TypeError, match="checkpoint must be a file path"):
        est.fit(_Reads(x), y, checkpoint=3)
    with pytest.raises(ValueError, match="got the folder"):
        est.fit(_Reads(x, fail_after=0), y, checkpoint=tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        est.fit(_Reads(x, fail_after=0), y, checkpoint=tmp_path / "no" / "fit.npz")
    with pytest.raises(ValueError, match="checkpoint_every"):
        est.fit(_Reads(x), y, checkpoint=fck, checkpoint_every=0)


def test_hvg_and_de_markers_of_x_on_disk():
    """HVG and the DE t-tests from one pass of moments (float64) give the in-memory
    markers and scores to float32 rounding; Wilcoxon, by blocks of genes of all cells,
    the in-memory scores; labels by obs name; bad values named with their rows."""
    counts, y, _ = datasets.make_markers(n_cells=700, n_genes=300, n_types=4, n_markers_per_type=3, n_xor_genes=0,
                                         random_state=0)
    x = pp.log1p(pp.normalize_total(counts)).astype(np.float32)
    x[:, 7] = 0.0  # an all-zero gene: NaN dispersion, zero scores
    x[:, 9] = 1.5  # a constant gene
    x0 = x.copy()
    src = streaming.RowSource(sp.csr_matrix(x))
    mem = jaxsel.HVGMarkers(n_markers=20).fit(x)
    disk = jaxsel.HVGMarkers(n_markers=20, chunk_size=128).fit(src)
    np.testing.assert_array_equal(disk.markers_, mem.markers_)
    np.testing.assert_allclose(disk.scores_, mem.scores_, rtol=1e-4, atol=1e-5, equal_nan=True)
    assert np.isnan(disk.scores_[[7, 9]]).all() and disk.n_features_in_ == 300
    for method in ("t-test", "t-test_overestim_var"):
        m = jaxsel.DEMarkers(n_markers=12, method=method).fit(x, y)
        d = jaxsel.DEMarkers(n_markers=12, method=method, chunk_size=100).fit(src, y)
        np.testing.assert_array_equal(d.markers_, m.markers_)
        np.testing.assert_allclose(d.class_scores_, m.class_scores_, rtol=1e-4, atol=1e-4)
        assert (d.class_scores_[:, [7, 9]] == 0).all()
    m = jaxsel.DEMarkers(n_markers=12, method="wilcoxon").fit(x, y)
    d = jaxsel.DEMarkers(n_markers=12, method="wilcoxon", chunk_size=100, memory_budget=4 * 700 * 50).fit(src, y)
    np.testing.assert_array_equal(d.class_scores_, m.class_scores_)  # 6 blocks of 50 genes, 7 passes
    np.testing.assert_array_equal(d.markers_, m.markers_)
    np.testing.assert_array_equal(x, x0)

    bad = x.copy()
    bad[300, 4] = -0.5
    with pytest.raises(ValueError, match=r"found minimum -0.5 \(rows 300..399\)"):
        jaxsel.HVGMarkers(n_markers=5, chunk_size=100).fit(streaming.RowSource(bad))
    bad[300, 4] = np.nan
    with pytest.raises(ValueError, match=r"X contains NaN or infinite values \(in rows 300..399\)"):
        jaxsel.DEMarkers(n_markers=5, chunk_size=100).fit(streaming.RowSource(bad), y)
    with pytest.raises(ValueError, match="n_markers"):
        jaxsel.HVGMarkers(n_markers=301).fit(src)
    with pytest.raises(ValueError, match="y"):
        jaxsel.DEMarkers(n_markers=5).fit(src, y[:-1])


SB_CV = dict(n_genes=4, hidden=(32, 16), learning_rate=3e-3, lasso=0.03, n_clusters=4, random_state=0,
             epochs={"pretrain": 2, "frozen": 3, "unfrozen": 20, "finetune": 4, "ae": 0})


def test_sparse_bottleneck_cross_validates_x_on_disk(tmp_path, monkeypatch):
    """cross_validate / selection_stability of an on-disk X: the in-memory folds, one
    streamed fit each, gene means per fold from one pass; the planted genes in every fold;
    test R^2 over each whole test fold (here the tracked R^2 of the last epoch, as the
    fold fits in a chunk) and within 0.02 of the in-memory CV's; killed in fold 1 and run
    again, fold 0 is read back and the result is the uninterrupted run's, bit for bit."""
    x, y, info = datasets.make_paired(n_cells=480, n_genes=40, n_outputs=5, n_informative=4, random_state=1)
    path = tmp_path / "paired.h5ad"
    anndata.AnnData(X=x).write_h5ad(path)
    a = anndata.read_h5ad(path, backed="r")
    y0 = y.copy()
    est = jaxsel.SparseBottleneck(**SB_CV, chunk_size=160)
    out = est.cross_validate(a.X, y, n_folds=3)
    np.testing.assert_array_equal(y, y0)
    assert not hasattr(est, "genes_")  # the estimator is not fitted
    for i, (tr, _, te) in enumerate(pp.kfold_indices(480, 3, random_state=0)):
        np.testing.assert_array_equal(out["test_indices"][i], te)
    assert out["genes"].shape == (3, 4) and out["history"]["test_r2"].shape == (3, 27)
    for g in out["genes"]:
        np.testing.assert_array_equal(np.sort(g), info["informative_genes"])
    assert len(out["stream_info"]) == 3 and out["stream_info"][0]["unfrozen"]["chunks_per_epoch"] == 2
    np.testing.assert_allclose(out["test_r2"], out["history"]["test_r2"][:, -1], rtol=1e-5)
    np.testing.assert_allclose(out["test_r2_per_feature"], out["history"]["test_r2_per_feature"][:, -1], rtol=1e-4,
                               atol=1e-5)
    mem = jaxsel.SparseBottleneck(**SB_CV).cross_validate(x, y, n_folds=3)
    np.testing.assert_allclose(out["test_r2"], mem["test_r2"], atol=0.02)
    assert (out["test_r2"] > 0.5).all()
    # a test fold larger than a chunk: R^2 tracked on a chunk of it, reported on all of it
    small = jaxsel.SparseBottleneck(**SB_CV, chunk_size=128).cross_validate(a.X, y, n_folds=3)
    assert not np.allclose(small["test_r2"], small["history"]["test_r2"][:, -1], rtol=1e-5)
    np.testing.assert_allclose(small["test_r2"], mem["test_r2"], atol=0.02)

    ck = tmp_path / "cv.npz"
    _die_after_first_checkpoint(monkeypatch, lambda p: "fold1" in str(p))
    with pytest.raises(KeyboardInterrupt):
        jaxsel.SparseBottleneck(**SB_CV, chunk_size=160).cross_validate(a.X, y, n_folds=3, checkpoint=ck,
                                                                        checkpoint_every=5)
    assert sorted(p.name for p in tmp_path.glob("cv.*")) == [
        "cv.fold0.finetune.npz", "cv.fold0.frozen.npz", "cv.fold0.pretrain.npz", "cv.fold0.unfrozen.npz",
        "cv.fold1.pretrain.npz"]
    again = jaxsel.SparseBottleneck(**SB_CV, chunk_size=160).cross_validate(a.X, y, n_folds=3, checkpoint=ck,
                                                                            checkpoint_every=5)
    assert again["stream_info"][0]["unfrozen"]["epoch_seconds"] == []  # read back
    assert again["stream_info"][1]["pretrain"]["first_epoch"] == 2 and again["stream_info"][1]["frozen"]["first_epoch"] == 0
    for k in ("test_r2", "train_r2", "test_r2_per_feature", "genes"):
        np.testing.assert_array_equal(again[k], out[k])
    for k in out["history"]:
        np.testing.assert_array_equal(again["history"][k], out["history"][k])

    stab = jaxsel.SparseBottleneck(**SB_CV, chunk_size=160).selection_stability(a.X, y, n_restarts=2)
    assert stab["genes"].shape == (2, 4) and stab["frequency"].shape == (40,)
    assert stab["frequency"][info["informative_genes"]].mean() >= 0.75
    # bad input refused by name before any training
    with pytest.raises(ValueError, match="X and Y must have the same number of cells, got 480 and 479"):
        jaxsel.SparseBottleneck(**SB_CV).cross_validate(a.X, y[:-1], n_folds=3)
    with pytest.raises(ValueError, match="n_folds must be an int >= 2, got 1"):
        jaxsel.SparseBottleneck(**SB_CV).cross_validate(a.X, y, n_folds=1)
    with pytest.raises(ValueError, match="batch_size must be a positive int, None or 'auto'"):
        jaxsel.SparseBottleneck(**SB_CV).cross_validate(a.X, y, n_folds=3, batch_size="x")
    with pytest.raises(ValueError, match="checkpoint_every"):
        jaxsel.SparseBottleneck(**SB_CV).cross_validate(a.X, y, n_folds=3, checkpoint=ck, checkpoint_every=0)
    with pytest.raises(ValueError, match="n_restarts"):
        jaxsel.SparseBottleneck(**SB_CV).selection_stability(a.X, y, n_restarts=1)


def test_tl_on_a_backed_anndata_streams_or_says_what_it_needs(files):
    """scanpy-style calls on ``read_h5ad(..., backed="r")``: the neural selectors stream
    it and write their keys into the (in-memory) var/uns; random markers need only its
    shape and DE markers read it once; copy=True (which would write a new file) is
    refused up front."""
    a = anndata.read_h5ad(files["h5ad"], backed="r")
    jaxsel.tl.markermap(a, 6, "cell_type", max_epochs=2, min_epochs=1, hidden_size=16, chunk_size=1024,
                        random_state=0)
    assert a.isbacked and a.var["markermap"].sum() == 6 and len(a.uns["markermap"]["markers"]) == 6
    jaxsel.tl.random_markers(a, 5, random_state=0)
    assert a.var["random_markers"].sum() == 5
    jaxsel.tl.de_markers(a, 5, labels_key="cell_type")  # one pass of per-type moments
    mem = a.to_memory()
    jaxsel.tl.de_markers(mem, 5, labels_key="cell_type")
    assert a.uns["de_markers"]["markers"] == mem.uns["de_markers"]["markers"]
    with pytest.raises(ValueError, match="copy=True needs an in-memory AnnData"):
        jaxsel.tl.markermap(a, 6, "cell_type", copy=True)


# ----------------------------------------------------------------------------- stAI: only the columns it uses


def test_read_columns_keeps_a_few_columns_and_every_rows_total(files):
    x = files["counts"]
    cols = np.array([5, 0, 77, 5])
    with streaming.RowSource(files["h5ad"]) as src:
        sub, totals = streaming.read_columns(src, cols, block_rows=700)
    assert sp.issparse(sub) and sub.format == "csr" and sub.shape == (N_CELLS, 4)
    np.testing.assert_array_equal(sub.toarray(), x[:, cols])
    np.testing.assert_array_equal(totals, x.sum(1, dtype=np.float64))
    dense, t2 = streaming.read_columns(streaming.RowSource(x), cols, block_rows=999)
    assert isinstance(dense, np.ndarray)
    np.testing.assert_array_equal(dense, x[:, cols])
    np.testing.assert_array_equal(t2, totals)
    # log_normalize over a few columns with the totals of all: the full result's columns
    full = pp.log_normalize(x)
    np.testing.assert_array_equal(pp.log_normalize(sub, totals=totals), full[:, cols])
    with streaming.RowSource(files["zarr"]) as src:  # normalised block by block into one array
        blocks, _ = streaming.read_columns(src, cols, block_rows=700, fn=lambda v, t: pp.log_normalize(v, totals=t))
    assert blocks.dtype == np.float32
    np.testing.assert_array_equal(blocks, full[:, cols])
    for fmt in (np.asarray, sp.csr_matrix, sp.csc_matrix):
        np.testing.assert_array_equal(pp.log_normalize(fmt(x), columns=cols), full[:, cols])
    with pytest.raises(ValueError, match="totals must have one value per row of X_ref"):
        pp.log_normalize(sub, totals=totals[:-1], name="X_ref")
    with pytest.raises(ValueError, match=rf"columns must hold column indices in \[0, {N_GENES}\), got values from 0 "
                                         rf"to {N_GENES}"):
        streaming.read_columns(streaming.RowSource(x), [0, N_GENES])
    with pytest.raises(ValueError, match="block_rows must be an int >= 1, got 0"):
        streaming.read_columns(streaming.RowSource(x), cols, block_rows=0)
    with pytest.raises(TypeError, match="columns must hold integer column indices, got dtype float64"):
        pp.log_normalize(x, columns=[0.0, 2.5])
    with pytest.raises(ValueError, match="columns must be a 1-D array of column indices"):
        pp.log_normalize(x, columns=[[0, 1]])
    with pytest.raises(ValueError, match="columns must hold column indices in"):
        pp.log_normalize(x, columns=[-1])
    for bad in (np.full(N_CELLS, np.nan), -totals, totals.astype(str)):
        with pytest.raises(ValueError, match="totals must hold finite, non-negative row sums"):
            pp.log_normalize(sub, totals=bad)
    bad = x.copy()
    bad[1500, 3] = -2
    with pytest.raises(ValueError, match=r"X_ref must be non-negative counts, found minimum -2.0 in rows 1400..2099"):
        streaming.read_columns(streaming.RowSource(bad), cols, block_rows=700, name="X_ref", nonnegative=True)
    bad[1500, 3] = np.nan
    with pytest.raises(ValueError, match=r"X_ref contains 1 NaN or infinite value\(s\) in rows 1400..2099"):
        streaming.read_columns(streaming.RowSource(bad), cols, block_rows=700, name="X_ref")


@pytest.fixture(scope="module")
def stai_pair(tmp_path_factory):
    """A spatial panel and a reference with more genes than the panel, both also on disk
    (the reference as CSR, the spatial data dense)."""
    d = tmp_path_factory.mktemp("stai")
    a, b, t = datasets.make_spatial_pair(n_spatial=240, n_ref=260, n_genes=30, n_measured=15, n_types=3,
                                         random_state=2)
    ref = anndata.AnnData(X=sp.csr_matrix(b.X), obs=b.obs.copy(), var=b.var.copy())
    ref.write_h5ad(d / "ref.h5ad")
    a.write_h5ad(d / "spatial.h5ad")
    labels = np.asarray(b.obs["cell_type"])
    kw = dict(coords=a.obsm["spatial"], spatial_genes=a.var_names, ref_genes=b.var_names)
    return dict(a=a, b=b, t=t, dir=d, labels=labels, kw=kw)


STAI_DISK = dict(n_calibration_folds=3, epochs=4, random_state=0)


def test_stai_fits_from_disk_reading_only_the_genes_it_uses(stai_pair, monkeypatch):
    """stAI's inputs from .h5ad files and a backed AnnData are the in-memory inputs, so the
    fit, the imputation and the annotation are the same bit for bit; only the shared and
    requested columns of the reference are kept (one pass, in blocks)."""
    p = stai_pair
    a, b, t, kw = p["a"], p["b"], p["t"], p["kw"]
    genes = list(t.var_names[:3])
    mem = jaxsel.StAI(**STAI_DISK).fit(a.X, b.X, p["labels"], genes=genes, **kw)
    seen = []
    real = streaming.read_columns

    def spy(src, columns, **k):
        seen.append((src.shape, len(columns), k["block_rows"]))
        return real(src, columns, **k)

    monkeypatch.setattr(streaming, "read_columns", spy)
    disk = jaxsel.StAI(**STAI_DISK).fit(p["dir"] / "spatial.h5ad", p["dir"] / "ref.h5ad", p["labels"], genes=genes,
                                        **kw)
    assert seen == [((240, 15), 15, 16384), ((260, 30), 15 + 3, 16384)]
    chex.assert_trees_all_equal(jax.device_get(disk.params_), jax.device_get(mem.params_))
    np.testing.assert_array_equal(disk.impute(), mem.impute())
    np.testing.assert_array_equal(disk.predict_proba(), mem.predict_proba())
    # a backed AnnData through the scanpy-style call
    backed = anndata.read_h5ad(p["dir"] / "ref.h5ad", backed="r")
    out = jaxsel.tl.stai(a, backed, "cell_type", genes=genes, **STAI_DISK)
    np.testing.assert_array_equal(out.X, mem.impute())
    # held-out genes from disk equal held-out genes in memory
    cv_mem = jaxsel.StAI(**STAI_DISK).cross_validate_genes(a.X, b.X, p["labels"], gene_folds=3, **kw)
    cv_disk = jaxsel.StAI(**STAI_DISK).cross_validate_genes(a.X, backed, p["labels"], gene_folds=3, **kw)
    np.testing.assert_array_equal(cv_disk.imputed, cv_mem.imputed)
    backed.file.close()


def test_stai_on_disk_bad_input_is_named(stai_pair, tmp_path):
    p = stai_pair
    a, b, kw = p["a"], p["b"], p["kw"]
    neg = b.X.copy()
    neg[200, 29] = -1  # a gene the model never uses: still refused, as in memory
    anndata.AnnData(X=neg, var=b.var.copy()).write_h5ad(tmp_path / "neg.h5ad")
    with pytest.raises(ValueError, match=r"X_ref must be non-negative counts, found minimum -1.0 in rows 0..259 "
                                         r"\(counts=True\); pass counts=False"):
        jaxsel.StAI(**STAI_DISK).fit(a.X, tmp_path / "neg.h5ad", p["labels"], **kw)
    with pytest.raises(ValueError, match="X_spatial: read_columns reads the stored values, and this RowSource applies"):
        jaxsel.StAI(**STAI_DISK).fit(streaming.markermap_recipe(p["dir"] / "spatial.h5ad"), b.X, p["labels"], **kw)
    with pytest.raises(ValueError, match="one name per column"):
        jaxsel.StAI(**STAI_DISK).fit(a.X, p["dir"] / "ref.h5ad", p["labels"], **{**kw, "ref_genes": b.var_names[:-1]})
    with pytest.raises(FileNotFoundError, match="X_ref"):
        jaxsel.StAI(**STAI_DISK).fit(a.X, tmp_path / "missing.h5ad", p["labels"], **kw)
    with pytest.raises(TypeError, match=r"X_ref must be a matrix .* got 'ref.csv'; files are read from .h5ad"):
        jaxsel.StAI(**STAI_DISK).fit(a.X, "ref.csv", p["labels"], **kw)

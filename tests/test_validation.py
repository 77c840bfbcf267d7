import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from jaxsel._validation import (
    fold_batch_size,
    check_labels,
    check_matrix,
    check_n_markers,
    check_random_state,
    to_dense,
)

# ----------------------------------------------------------------------------- check_matrix


def test_check_matrix_converts_lists_and_ints_to_float32():
    out = check_matrix([[1, 2], [3, 4]])
    assert isinstance(out, np.ndarray)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, [[1, 2], [3, 4]])


def test_check_matrix_dtype_none_keeps_float64_and_casts_ints():
    x64 = np.ones((2, 3))
    assert check_matrix(x64, dtype=None).dtype == np.float64
    assert check_matrix(np.ones((2, 3), dtype=np.int64), dtype=None).dtype == np.float32


def test_check_matrix_keeps_sparse_and_converts_coo_to_csr():
    x = sp.random(20, 10, density=0.3, format="coo", random_state=0, dtype=np.float64)
    out = check_matrix(x)
    assert sp.issparse(out) and out.format == "csr" and out.dtype == np.float32
    np.testing.assert_allclose(out.toarray(), x.toarray(), rtol=1e-6)
    csc = check_matrix(x.tocsc())
    assert csc.format == "csc"
    # the input is untouched
    assert x.dtype == np.float64 and x.format == "coo"


def test_check_matrix_densifies_when_sparse_not_allowed():
    x = sp.eye(4, format="csr", dtype=np.float32)
    out = check_matrix(x, allow_sparse=False)
    assert isinstance(out, np.ndarray)
    np.testing.assert_array_equal(out, np.eye(4))


def test_check_matrix_size_guard_refuses_large_densification():
    x = sp.csr_matrix((1000, 1000), dtype=np.float32)  # 4 MB dense
    with pytest.raises(ValueError, match="max_dense_bytes"):
        check_matrix(x, allow_sparse=False, max_dense_bytes=1_000_000)
    with pytest.raises(ValueError, match="max_dense_bytes"):
        to_dense(x, max_dense_bytes=1_000_000)
    assert to_dense(x, max_dense_bytes=4_000_000).shape == (1000, 1000)


def test_to_dense_passes_dense_through_without_copy():
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    assert to_dense(x) is x


@pytest.mark.parametrize(
    "bad, match",
    [
        (np.zeros(5), "2-D"),
        (np.zeros((2, 2, 2)), "2-D"),
        (np.zeros((0, 4)), "empty"),
        (np.zeros((3, 0)), "empty"),
        (np.array([[1.0, np.nan]]), "NaN"),
        (np.array([[1.0, np.inf]]), "NaN or infinite"),
        (sp.csr_matrix(np.array([[0.0, np.nan]])), "NaN"),
    ],
)
def test_check_matrix_rejects_bad_shapes_and_values(bad, match):
    with pytest.raises(ValueError, match=match):
        check_matrix(bad, name="counts")


def test_check_matrix_error_names_the_argument():
    with pytest.raises(ValueError, match="^counts"):
        check_matrix(np.zeros(3), name="counts")


@pytest.mark.parametrize("bad", [np.array([["a", "b"]]), np.array([[1 + 1j, 2]])])
def test_check_matrix_rejects_non_real_dtypes(bad):
    with pytest.raises(TypeError, match="real numbers"):
        check_matrix(bad)


def test_check_matrix_rejects_anndata():
    anndata = pytest.importorskip("anndata")
    with pytest.raises(TypeError, match="adata.X"):
        check_matrix(anndata.AnnData(np.ones((3, 2), dtype=np.float32)))


def test_check_matrix_require_counts():
    check_matrix(np.array([[0.0, 3.0], [1.0, 2.0]]), require_counts=True)
    check_matrix(sp.csr_matrix(np.array([[0.0, 3.0]])), require_counts=True)
    with pytest.raises(ValueError, match="non-negative"):
        check_matrix(np.array([[1.0, -1.0]]), require_counts=True)
    with pytest.raises(ValueError, match="integer-valued"):
        check_matrix(np.array([[1.0, 0.5]]), require_counts=True)
    with pytest.raises(ValueError, match="integer-valued"):
        check_matrix(sp.csr_matrix(np.array([[0.0, 2.25]])), require_counts=True)
    # negatives are fine without the flag (scaled data)
    check_matrix(np.array([[1.0, -1.0]]))


# ----------------------------------------------------------------------------- check_labels


def test_check_labels_encodes_sorted_classes():
    y = np.array(["b", "a", "c", "a"])
    codes, classes = check_labels(y, 4)
    assert codes.dtype == np.int32
    np.testing.assert_array_equal(classes, ["a", "b", "c"])
    np.testing.assert_array_equal(codes, [1, 0, 2, 0])
    np.testing.assert_array_equal(classes[codes], y)


def test_check_labels_accepts_pandas_and_column_vectors():
    s = pd.Series(pd.Categorical(["x", "y", "x"], categories=["y", "x", "unused"]))
    codes, classes = check_labels(s, 3)
    np.testing.assert_array_equal(classes[codes], ["x", "y", "x"])
    codes, classes = check_labels(np.array([[3], [1], [3]]), 3)
    np.testing.assert_array_equal(codes, [1, 0, 1])
    np.testing.assert_array_equal(classes, [1, 3])


def test_check_labels_errors():
    with pytest.raises(ValueError, match="3 labels but x has 4 cells"):
        check_labels([0, 1, 0], 4)
    with pytest.raises(ValueError, match="missing"):
        check_labels([0.0, np.nan, 1.0], 3)
    with pytest.raises(ValueError, match="missing"):
        check_labels(np.array(["a", None, "b"], dtype=object), 3)
    with pytest.raises(ValueError, match="at least 2 distinct classes"):
        check_labels(["a", "a", "a"], 3)
    with pytest.raises(ValueError, match="1-D"):
        check_labels(np.zeros((3, 2)), 3)
    with pytest.raises(TypeError, match="sortable"):
        check_labels(np.array(["a", 1, "b"], dtype=object), 3)
    with pytest.raises(ValueError, match="^labels"):
        check_labels([0, 1], 3, name="labels")


def test_check_labels_min_classes_one_and_no_length_check():
    codes, classes = check_labels(["a", "a"], None, min_classes=1)
    np.testing.assert_array_equal(codes, [0, 0])
    assert classes.tolist() == ["a"]


# ----------------------------------------------------------------------------- scalars


def test_check_n_markers():
    assert check_n_markers(3, 10) == 3
    assert check_n_markers(np.int64(10), 10) == 10
    for bad in (True, 2.0, "3", None):
        with pytest.raises(TypeError, match="n_markers"):
            check_n_markers(bad, 10)
    for bad in (0, -1, 11):
        with pytest.raises(ValueError, match=r"\[1, n_genes=10\]"):
            check_n_markers(bad, 10)


def test_check_random_state():
    assert check_random_state(None) == 0
    assert check_random_state(7) == 7
    assert isinstance(check_random_state(np.int32(7)), int)
    a = check_random_state(np.random.default_rng(1))
    b = check_random_state(np.random.default_rng(1))
    assert a == b and 0 <= a < 2**32
    assert check_random_state(np.random.RandomState(1)) == check_random_state(
        np.random.RandomState(1)
    )
    for bad in (True, 1.5, "0"):
        with pytest.raises(TypeError, match="random_state"):
            check_random_state(bad)
    for bad in (-1, 2**32):
        with pytest.raises(ValueError, match="random_state"):
            check_random_state(bad)


def test_fold_batch_size_resolves_auto_by_platform_and_names_bad_values():
    import jax

    assert fold_batch_size("auto") == (1 if jax.default_backend() == "cpu" else None)
    assert fold_batch_size(None) is None and fold_batch_size(3) == 3
    with pytest.raises(ValueError, match="model_batch_size must be a positive int, None or 'auto'"):
        fold_batch_size("vmap", "model_batch_size")
    with pytest.raises(ValueError, match="batch_size must be an int >= 1"):
        fold_batch_size(0)
    with pytest.raises(TypeError, match="batch_size"):
        fold_batch_size(2.5)

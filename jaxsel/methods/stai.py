"""stAI: spatial gene imputation and cell-type annotation, functional core.

Zou et al., "stAI: a deep learning-based model for missing gene imputation and cell-type
annotation of spatial transcriptomics", NAR (2025). Two datasets share genes: spatial
cells ``X1`` with coordinates and a reference scRNA-seq ``X2`` with cell-type labels.

Model (as the authors' released code, ``stAI/stai.py`` and ``stAI/layers.py``)
------------------------------------------------------------------------------
- spatial encoder: ``G -> 64 (ReLU) -> 16``, one graph-attention layer over the spatial
  kNN table (self included, LeakyReLU 0.01, residual), then a linear ``16 -> 16``;
- reference encoder: ``G -> 64 (ReLU) -> 16``; two decoders ``16 -> 64 (ReLU) -> G``;
- classifier on the reference latent ``16 -> 64 (LeakyReLU) -> n_classes``;
- imputation weights of a spatial cell over the reference cells (``attention``):
  ``"euclidean"`` (default) is a softmax of negative latent distances over the ``top_k``
  nearest reference cells (50), zero elsewhere; ``"dot"`` is the learnable variant
  ``softmax_j(Q z1_i . K z2_j)`` over all reference cells (linear ``Q``, ``K``; like the
  released code, no ``1/sqrt(d)`` scaling). Imputed expression = weights times the
  reference's expression.
- loss (defaults: the authors' ``osmFISH_impute.yaml``):
  ``recon * (MSE_1 + MSE_2) + mmd * MMD(Z1, Z2) + cos * consistence + impute * (1 -
  Pearson over the calibration genes) + clf * cross-entropy + gene * gene consistence``.
  Gene consistence compares, for every calibration gene, its correlations with the input
  genes in the spatial data (calibration genes imputed) and in the reference:
  ``gene_loss="cosine"`` is the released code's ``1 - cosine`` between those correlation
  columns; ``"frobenius"`` is the paper's squared Frobenius distance of the two
  correlation matrices (mean over entries).

Calibration submodels: the shared genes are split into ``k`` folds; submodel ``j`` sees
the other folds' genes as input and learns to impute fold ``j``. A submodel's genes are a
*mask* over the shared genes (inputs of the masked genes are zero, their reconstruction
and consistence terms masked), so every submodel has the same shapes and the ``k``
submodels, and the held-out gene folds of an evaluation protocol, are one vmapped
program (:func:`fit`). Training is full batch for ``epochs`` Adam steps (the authors'
setting), one ``lax.fori_loop`` from a :class:`FitState` (:func:`start`,
:func:`resume`), so a fit can stop after any epoch, be checkpointed and go on bit for bit.

The hot loop (one full-batch step per submodel) is the MMD over all cell pairs and the
top-k neighbour search; neither materialises an ``[n1, n2]`` matrix beyond a row tile:
:func:`jaxsel.losses.mmd_rbf` scans 128-row tiles with an analytic gradient, and the
imputation weights are gathered for the ``top_k`` selected pairs only (their gradient is
a ``[n1, top_k]`` gather, not a dense scatter). Inference is chunked over spatial cells.

Initialisation follows the released code: the reference encoder and both decoders are
N(0, 0.1^2) (weights and biases), the other linear layers PyTorch's default with the
submodel's number of input genes as fan-in (``n_inputs``), the GAT layer Glorot.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from .. import losses
from ..engine import adam, chunk_map, map_folds, progress
from .baselines import nearest_indices
from ..nn.gat import GATConv
from ..nn.layers import TorchDense, softmax, torch_bias_init

__all__ = [
    "StAIConfig",
    "StAINet",
    "StAIData",
    "fit",
    "start",
    "resume",
    "FitState",
    "attention_weights",
    "topk_attention",
    "gene_consistence",
    "loss_fn",
    "impute",
    "annotate",
    "embed",
]

_STATIC = ("n_genes", "n_classes", "hidden", "latent", "top_k", "epochs", "gat_heads", "attention", "gene_loss",
           "n_inputs", "progress")
_LEAVES = ("lam_recon", "lam_mmd", "lam_cos", "lam_impute", "lam_clf", "lam_gene", "learning_rate")
ATTENTIONS = ("euclidean", "dot")
GENE_LOSSES = ("cosine", "frobenius")


@functools.partial(jax.tree_util.register_dataclass, data_fields=list(_LEAVES), meta_fields=list(_STATIC))
@dataclasses.dataclass(frozen=True)
class StAIConfig:
    """Structure (static) and loss weights / learning rate (leaves, so a grid of weights
    can be a leading axis without recompiling).

    Defaults are the authors' imputation configuration (``osmFISH_impute.yaml``):
    hidden 64, latent 16, 500 full-batch epochs, Adam lr 0.002, weights recon 1, MMD 0.1,
    cos 1, impute 1, clf 0.1, gene 0. :meth:`annotation` gives their annotation
    configuration. ``n_inputs`` (default ``n_genes``) is the number of input genes a
    submodel sees, used only as the fan-in of the PyTorch-style initialisation.
    ``progress``: a label to print a progress line under (epoch, loss, time; one host
    callback per epoch and model, :mod:`jaxsel.engine.progress`), ``None`` for none.
    """

    n_genes: int
    n_classes: int
    hidden: int = 64
    latent: int = 16
    top_k: int = 50
    epochs: int = 500
    gat_heads: int = 1
    attention: str = "euclidean"
    gene_loss: str = "cosine"
    n_inputs: int | None = None
    lam_recon: float = 1.0
    lam_mmd: float = 0.1
    lam_cos: float = 1.0
    lam_impute: float = 1.0
    lam_clf: float = 0.1
    lam_gene: float = 0.0
    learning_rate: float = 0.002
    progress: str | None = None

    def __post_init__(self):
        if self.attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {ATTENTIONS}, got {self.attention!r}")
        if self.gene_loss not in GENE_LOSSES:
            raise ValueError(f"gene_loss must be one of {GENE_LOSSES}, got {self.gene_loss!r}")

    @classmethod
    def annotation(cls, n_genes: int, n_classes: int, **overrides) -> "StAIConfig":
        """The authors' annotation configuration (``osmFISH_annotate.yaml``): 300 epochs,
        clf 10, impute 2, gene 1 (the other weights as for imputation). They also weight
        the cross-entropy by ``1 / count^2`` per class (see :func:`class_weights`)."""
        kw = dict(epochs=300, lam_clf=10.0, lam_impute=2.0, lam_gene=1.0)
        kw.update(overrides)
        return cls(n_genes, n_classes, **kw)

    @property
    def net(self) -> "StAINet":
        return StAINet(self.n_genes, self.n_classes, self.hidden, self.latent, self.gat_heads, self.attention,
                       self.n_inputs or self.n_genes)


_normal = nn.initializers.normal(0.1)


def _dense(n, name):
    return nn.Dense(n, kernel_init=_normal, bias_init=_normal, name=name)


def _torch_dense_in(n, fan_in, name):
    """PyTorch-default Linear whose fan-in is the submodel's input gene count (the masked
    genes are zero inputs, so the layer sees ``fan_in`` genes as in the released code)."""
    bound = 1.0 / float(fan_in) ** 0.5
    init = lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)  # noqa: E731
    return nn.Dense(n, kernel_init=init, bias_init=torch_bias_init(fan_in), name=name)


class StAINet(nn.Module):
    """Encoders, decoders, classifier and (``attention="dot"``) query/key maps."""

    n_genes: int
    n_classes: int
    hidden: int
    latent: int
    gat_heads: int = 1
    attention: str = "euclidean"
    n_inputs: int | None = None

    def setup(self):
        fan_in = self.n_inputs or self.n_genes
        self.sp_in = _torch_dense_in(self.hidden, fan_in, "sp_in")
        self.sp_mid = TorchDense(self.latent, name="sp_mid")
        self.gat = GATConv(self.latent, heads=self.gat_heads, name="gat")
        self.sp_post = TorchDense(self.latent, name="sp_post")
        self.ref_in, self.ref_out = _dense(self.hidden, "ref_in"), _dense(self.latent, "ref_out")
        self.dec_sp = [_dense(self.hidden, "dec_sp_h"), _dense(self.n_genes, "dec_sp_out")]
        self.dec_ref = [_dense(self.hidden, "dec_ref_h"), _dense(self.n_genes, "dec_ref_out")]
        self.clf_h, self.clf_out = TorchDense(self.hidden, name="clf_h"), TorchDense(self.n_classes, name="clf_out")
        if self.attention == "dot":
            self.query, self.key = TorchDense(self.latent, name="query"), TorchDense(self.latent, name="key")

    def encode_spatial(self, x, neighbours):
        z = self.sp_mid(nn.relu(self.sp_in(x)))
        z = z + nn.leaky_relu(self.gat(z, neighbours), 0.01)  # residual GAT block
        return self.sp_post(z)

    def encode_ref(self, x):
        return self.ref_out(nn.relu(self.ref_in(x)))

    @staticmethod
    def _decode(layers, z):
        return layers[1](nn.relu(layers[0](z)))

    def decode_spatial(self, z):
        return self._decode(self.dec_sp, z)

    def decode_ref(self, z):
        return self._decode(self.dec_ref, z)

    def classify(self, z):
        return self.clf_out(nn.leaky_relu(self.clf_h(z), 0.01))

    def scores(self, z_query, z_ref):
        """Dot-product attention logits ``Q z_query . K z_ref``, ``[n_query, n_ref]``."""
        return self.query(z_query) @ self.key(z_ref).T

    def __call__(self, x1, neighbours, x2):
        z1, z2 = self.encode_spatial(x1, neighbours), self.encode_ref(x2)
        out = {
            "z1": z1,
            "z2": z2,
            "x1_rec": self.decode_spatial(z1),
            "x2_rec": self.decode_ref(z2),
            "x1_cross": self.decode_ref(z1),
            "x2_cross": self.decode_spatial(z2),
            "logits2": self.classify(z2),
        }
        if self.attention == "dot":
            out["scores"] = self.scores(z1[:1], z2[:1])  # creates Q, K at init
        return out


class StAIData(NamedTuple):
    """Device arrays of one problem.

    ``x1`` [n1, G] scaled spatial expression (or [F, n1, G]: one per held-out gene fold
    of a protocol, selected per model by ``x1_index`` in :func:`fit`); ``neighbours``
    int32 [n1, k + 1] spatial kNN table (column 0 the cell itself); ``x2`` [n2, G]
    scaled reference expression; ``labels`` int32 [n2]; ``class_weights`` [n_classes]
    cross-entropy weights (ones for the plain mean), or [n_classes + 1] whose last entry
    is 0: the weight of unlabeled reference cells, whose label is ``n_classes``.
    """

    x1: jax.Array
    neighbours: jax.Array
    x2: jax.Array
    labels: jax.Array
    class_weights: jax.Array


def topk_attention(z_query, z_ref, top_k: int):
    """Sparse Euclidean imputation weights: ``(w [n_query, k], idx [n_query, k])``, the
    softmax of negative latent distances over the ``k = min(top_k, n_ref)`` nearest
    reference cells and their indices. Only the ``[n_query, n_ref]`` distances exist
    transiently (chunk the queries to bound them)."""
    idx = nearest_indices(jax.lax.stop_gradient(z_query), jax.lax.stop_gradient(z_ref), top_k)
    # distances of the selected pairs recomputed from gathered rows: the gradient is a
    # [n_query, k] gather, never a dense [n_query, n_ref] scatter
    diff = z_query[:, None, :] - jnp.take(z_ref, idx, axis=0)
    neg = -jnp.sqrt(jnp.maximum(jnp.sum(diff * diff, -1), 1e-12))
    return softmax(neg, axis=1), idx


def attention_weights(z_query, z_ref, top_k: int):
    """Dense form of :func:`topk_attention`, ``[n_query, n_ref]``; every row sums to one."""
    w, idx = topk_attention(z_query, z_ref, top_k)
    rows = jnp.arange(z_query.shape[0])[:, None]
    return jnp.zeros((z_query.shape[0], z_ref.shape[0]), w.dtype).at[rows, idx].set(w)


def _weighted_values(net: StAINet, params, z_query, z_ref, values, top_k: int):
    """Imputation weights of ``z_query`` over ``z_ref`` applied to ``values`` [n_ref, m]."""
    if net.attention == "euclidean":
        w, idx = topk_attention(z_query, z_ref, top_k)
        return jnp.einsum("nk,nkm->nm", w, jnp.take(values, idx, axis=0))
    s = net.apply({"params": params}, z_query, z_ref, method=StAINet.scores)
    return softmax(s, axis=1) @ values


def _correlation(a, b, eps: float = 1e-6):
    """Pearson correlations between the columns of ``a`` [n, p] and ``b`` [n, q], ``[p, q]``."""
    ac, bc = a - jnp.mean(a, 0), b - jnp.mean(b, 0)
    cov = ac.T @ bc
    return cov / jnp.sqrt(jnp.sum(ac * ac, 0)[:, None] * jnp.sum(bc * bc, 0)[None, :] + eps)


def gene_consistence(x1, pred1, x2, fit_mask, cal_mask, kind: str = "cosine"):
    """Gene-consistence loss between the spatial and reference gene-gene correlations.

    ``C1 = corr(x1 input genes, pred1 calibration genes)``, ``C2 = corr(x2 input genes,
    x2 calibration genes)``, rows restricted to ``fit_mask`` and columns to
    ``cal_mask`` ([G] 0/1). ``kind="cosine"``: ``1 - mean over calibration genes of
    cosine(C1[:, j], C2[:, j])`` (the released code); ``"frobenius"``: mean squared
    difference of the entries (the paper's Frobenius form, normalised by the count).
    """
    c1, c2 = _correlation(x1, pred1), _correlation(x2, x2)
    rows = fit_mask[:, None]
    n_cal = jnp.maximum(jnp.sum(cal_mask), 1.0)
    if kind == "cosine":
        num = jnp.sum(c1 * c2 * rows, 0)
        den = jnp.sqrt(jnp.sum(c1 * c1 * rows, 0) * jnp.sum(c2 * c2 * rows, 0) + 1e-6)
        return 1.0 - jnp.sum(num / den * cal_mask) / n_cal
    if kind == "frobenius":
        w = rows * cal_mask[None, :]
        return jnp.sum(jnp.square(c1 - c2) * w) / jnp.maximum(jnp.sum(w), 1.0)
    raise ValueError(f"kind must be one of {GENE_LOSSES}, got {kind!r}")


def class_weights(labels, n_classes: int, power: float = 0.0, *, unlabeled: bool = False):
    """Cross-entropy class weights ``1 / count^power`` (the authors' ``p_class``; absent
    classes get weight 1), normalised to mean 1 over present classes. With ``unlabeled``
    the label ``n_classes`` marks a cell without a type: it is not counted and the result
    has one more entry, 0, its weight (see :class:`StAIData`)."""
    counts = jnp.bincount(jnp.asarray(labels), length=n_classes + 1)[:n_classes].astype(jnp.float32)
    w = 1.0 / jnp.maximum(counts, 1.0) ** power
    present = counts > 0
    w = w / jnp.sum(jnp.where(present, w, 0.0)) * jnp.maximum(jnp.sum(present), 1)
    return jnp.concatenate([w, jnp.zeros((1,), w.dtype)]) if unlabeled else w


def _masked_mse(a, b, gene_w):
    return jnp.sum(jnp.square(a - b) * gene_w) / (a.shape[0] * jnp.maximum(jnp.sum(gene_w), 1.0))


def loss_fn(cfg: StAIConfig, params, data: StAIData, fit_mask, cal_mask):
    """Total loss and its terms for one submodel (``fit_mask``/``cal_mask``: [G] 0/1;
    ``data.x1`` [n1, G])."""
    net = cfg.net
    x1, x2 = data.x1 * fit_mask, data.x2 * fit_mask
    out = net.apply({"params": params}, x1, data.neighbours, x2)
    recon = _masked_mse(out["x1_rec"], x1, fit_mask) + _masked_mse(out["x2_rec"], x2, fit_mask)
    cos = jnp.mean(losses.cosine_consistence(out["x1_cross"] * fit_mask, x1)) + jnp.mean(
        losses.cosine_consistence(out["x2_cross"] * fit_mask, x2)
    )
    mmd = losses.mmd_rbf(out["z1"], out["z2"])
    # the calibration genes of the scaled reference, weighted (the released code's training)
    pred = _weighted_values(net, params, out["z1"], out["z2"], data.x2, cfg.top_k)
    impute = losses.pearson_loss(pred, data.x1, cal_mask)
    cw = data.class_weights[data.labels]  # 0 for unlabeled cells (label n_classes)
    known = jnp.minimum(data.labels, out["logits2"].shape[-1] - 1)
    clf = jnp.sum(losses.cross_entropy(out["logits2"], known) * cw) / jnp.sum(cw)
    gene = gene_consistence(x1, pred, data.x2, fit_mask, cal_mask, cfg.gene_loss)
    total = (cfg.lam_recon * recon + cfg.lam_mmd * mmd + cfg.lam_cos * cos + cfg.lam_impute * impute
             + cfg.lam_clf * clf + cfg.lam_gene * gene)
    return total, {"recon": recon, "mmd": mmd, "cos": cos, "impute": impute, "clf": clf, "gene": gene}


def _select_x1(data: StAIData, x1_index):
    return data._replace(x1=data.x1[x1_index])


def _stacked_x1(data: StAIData, x1_index, n_models: int):
    """``(data, x1_index)`` with ``data.x1`` always [F, n1, G]: a single spatial input
    becomes a stack of one that every model indexes."""
    if x1_index is None:
        return data._replace(x1=data.x1[None]), jnp.zeros(n_models, jnp.int32)
    return data, x1_index


def init_params(cfg: StAIConfig, key, data: StAIData):
    x1 = data.x1 if data.x1.ndim == 2 else data.x1[0]
    return cfg.net.init(key, x1[:2], data.neighbours[:2] * 0, data.x2[:2])["params"]


_TERMS = ("recon", "mmd", "cos", "impute", "clf", "gene")


class FitState(NamedTuple):
    """Where a fit stands (per model; a leading [M] axis from :func:`start`): parameters,
    Adam state, the per-epoch loss terms so far (NaN for epochs not run) and the next
    epoch. :func:`resume` goes on from it, so a fit cut into segments (checkpointed
    between them) equals one run straight through, bit for bit."""

    params: Any
    opt_state: Any
    history: dict
    epoch: jax.Array


def _start_one(cfg: StAIConfig, key, data: StAIData):
    params = init_params(cfg, key, data)
    nan = jnp.full((cfg.epochs,), jnp.nan, jnp.float32)
    history = {name: nan for name in ("loss",) + _TERMS}
    return FitState(params, adam(cfg.learning_rate).init(params), history, jnp.int32(0))


def _resume_one(cfg: StAIConfig, data: StAIData, fit_mask, cal_mask, state: FitState, stop_after):
    """Full-batch Adam epochs ``state.epoch .. stop_after - 1`` of one model."""
    tx = adam(cfg.learning_rate)
    grad = jax.value_and_grad(functools.partial(loss_fn, cfg), has_aux=True)

    def body(epoch, st):
        (loss, terms), g = grad(st.params, data, fit_mask, cal_mask)
        upd, opt = tx.update(g, st.opt_state, st.params)
        if cfg.progress is not None:
            jax.debug.callback(functools.partial(progress.report, cfg.progress, cfg.epochs), epoch, loss)
        hist = {k: h.at[epoch].set(loss if k == "loss" else terms[k]) for k, h in st.history.items()}
        return FitState(optax.apply_updates(st.params, upd), opt, hist, epoch + 1)

    stop = jnp.minimum(jnp.asarray(stop_after, jnp.int32), cfg.epochs)
    return jax.lax.fori_loop(state.epoch, jnp.maximum(stop, state.epoch), body, state)


def _fit_one(cfg: StAIConfig, key, data: StAIData, fit_mask, cal_mask):
    """One model straight through: ``(params, history)``."""
    st = _resume_one(cfg, data, fit_mask, cal_mask, _start_one(cfg, key, data), cfg.epochs)
    return st.params, st.history


def _start_model(per_model, shared):
    cfg, data = shared
    key, x1_index = per_model
    return _start_one(cfg, key, _select_x1(data, x1_index))


def _resume_model(per_model, shared):
    cfg, data, stop_after = shared
    fit_mask, cal_mask, x1_index, state = per_model
    return _resume_one(cfg, _select_x1(data, x1_index), fit_mask, cal_mask, state, stop_after)


@functools.partial(jax.jit, static_argnames=("batch_size", "mesh"))
def start(cfg: StAIConfig, keys, data: StAIData, x1_index=None, *, batch_size=None, mesh=None) -> FitState:
    """The initial :class:`FitState` of ``M = len(keys)`` models (see :func:`fit`)."""
    data, x1_index = _stacked_x1(data, x1_index, keys.shape[0])
    return map_folds(_start_model, (keys, x1_index), (cfg, data), batch_size=batch_size, mesh=mesh)


@functools.partial(jax.jit, static_argnames=("batch_size", "mesh"))
def resume(cfg: StAIConfig, data: StAIData, fit_masks, cal_masks, state: FitState, stop_after, x1_index=None, *,
           batch_size=None, mesh=None) -> FitState:
    """Run every model of ``state`` up to epoch ``stop_after`` (at most ``cfg.epochs``);
    one compiled program serves every segment."""
    data, x1_index = _stacked_x1(data, x1_index, fit_masks.shape[0])
    per_model = (fit_masks, cal_masks, x1_index, state)
    return map_folds(_resume_model, per_model, (cfg, data, stop_after), batch_size=batch_size, mesh=mesh)


@functools.partial(jax.jit, static_argnames=("batch_size", "mesh"))
def fit(cfg: StAIConfig, keys, data: StAIData, fit_masks, cal_masks, x1_index=None, *, batch_size=None, mesh=None):
    """Fit ``M`` models (calibration submodels, times held-out gene folds) in one program.

    ``keys`` [M] PRNG keys; ``fit_masks``/``cal_masks`` [M, G] 0/1 gene masks (model
    ``m`` sees ``fit_masks[m]`` and learns to impute ``cal_masks[m]``); ``x1_index``
    [M] int, when ``data.x1`` is [F, n1, G], picks each model's spatial input. The model
    axis runs vmapped, ``batch_size`` at a time with ``lax.map``, or sharded over
    ``mesh`` (see :func:`jaxsel.engine.map_folds`). Returns per-model parameters and the
    per-epoch loss terms (leading [M] axis).
    """
    st = start(cfg, keys, data, x1_index, batch_size=batch_size, mesh=mesh)
    st = resume(cfg, data, fit_masks, cal_masks, st, cfg.epochs, x1_index, batch_size=batch_size, mesh=mesh)
    return st.params, st.history


def _encode(cfg: StAIConfig, params, data: StAIData, fit_mask):
    net = cfg.net
    z1 = net.apply({"params": params}, data.x1 * fit_mask, data.neighbours, method=StAINet.encode_spatial)
    z2 = net.apply({"params": params}, data.x2 * fit_mask, method=StAINet.encode_ref)
    return z1, z2


def _models_apply(fn, params, fit_masks, x1_index, data, batch_size):
    """``fn(params_m, data_m, fit_mask_m)`` over the model axis."""
    data, x1_index = _stacked_x1(data, x1_index, fit_masks.shape[0])
    one = lambda pm, d: fn(pm[0], _select_x1(d, pm[2]), pm[1])  # noqa: E731
    return map_folds(one, (params, fit_masks, x1_index), data, batch_size=batch_size)


@functools.partial(jax.jit, static_argnames=("chunk", "batch_size"))
def impute(cfg: StAIConfig, params, data: StAIData, fit_masks, values, x1_index=None, *, chunk: int = 1024,
           batch_size=None):
    """Imputed ``values`` (reference expression [n2, m] of the genes to impute) for every
    spatial cell from every model: ``[M, n1, m]``. Chunked over spatial cells, so at most
    ``chunk x n2`` similarities exist per model at a time; ``batch_size`` models at once
    (``None``: all vmapped)."""
    net = cfg.net

    def one(p, d, fm):
        z1, z2 = _encode(cfg, p, d, fm)
        return chunk_map(lambda zc: _weighted_values(net, p, zc, z2, values, cfg.top_k), z1, chunk)

    return _models_apply(one, params, fit_masks, x1_index, data, batch_size)


@functools.partial(jax.jit, static_argnames=("batch_size",))
def annotate(cfg: StAIConfig, params, data: StAIData, fit_masks, x1_index=None, *, batch_size=None):
    """Class probabilities of the spatial cells from the classifier on their latent, per
    model: ``[M, n1, n_classes]``."""
    net = cfg.net

    def one(p, d, fm):
        z1, _ = _encode(cfg, p, d, fm)
        return jax.nn.softmax(net.apply({"params": p}, z1, method=StAINet.classify), axis=-1)

    return _models_apply(one, params, fit_masks, x1_index, data, batch_size)


@functools.partial(jax.jit, static_argnames=("batch_size",))
def embed(cfg: StAIConfig, params, data: StAIData, fit_masks, x1_index=None, *, batch_size=None):
    """Latent representations ``(z1 [M, n1, latent], z2 [M, n2, latent])`` per model."""
    return _models_apply(lambda p, d, fm: _encode(cfg, p, d, fm), params, fit_masks, x1_index, data, batch_size)

"""stAI: spatial gene imputation and cell-type annotation (work in progress).

Zou et al., "stAI: a deep learning-based model for missing gene imputation and cell-type
annotation of spatial transcriptomics", NAR (2025). Two datasets share genes: spatial
cells ``X1`` with coordinates and a reference scRNA-seq ``X2`` with cell-type labels.

Model (defaults from the authors' released configuration)
---------------------------------------------------------
- spatial encoder: ``G -> 64 (ReLU) -> 16``, one graph-attention layer over the spatial
  kNN table (self included, LeakyReLU, residual), then a linear ``16 -> 16``;
- reference encoder: ``G -> 64 (ReLU) -> 16``; two decoders ``16 -> 64 (ReLU) -> G``;
- classifier on the reference latent ``16 -> 64 (LeakyReLU) -> n_classes``;
- imputation: every spatial cell's weights over the reference cells are a softmax of
  negative latent distances restricted to the ``top_k`` nearest (50), and the imputed
  expression is those weights times the reference's expression;
- loss: ``recon * (MSE_1 + MSE_2) + mmd * MMD(Z1, Z2) + cos * (consistence of each input
  with its reconstruction through the other decoder) + impute * (1 - Pearson over the
  calibration genes) + clf * cross-entropy``.

Calibration submodels: the shared genes are split into ``k`` folds; submodel ``j`` sees
the other folds' genes as input and learns to impute fold ``j``. All submodels have the
same shapes because a submodel's genes are a *mask* over the shared genes (inputs of the
held-out genes are zeroed and their reconstruction terms masked), so the ``k`` submodels
are one vmapped program. Training is full batch for ``epochs`` Adam steps (the authors'
setting), one ``lax.scan``.

Initialisation: the MLP weights and biases are N(0, 0.1^2) as in the released code.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from .. import losses
from ..nn.gat import GATConv

__all__ = ["StAIConfig", "StAINet", "StAIData", "fit_submodels", "attention_weights", "impute", "annotate"]

_STATIC = ("n_genes", "n_classes", "hidden", "latent", "top_k", "epochs", "gat_heads")
_LEAVES = ("lam_recon", "lam_mmd", "lam_cos", "lam_impute", "lam_clf", "learning_rate")


@functools.partial(jax.tree_util.register_dataclass, data_fields=list(_LEAVES), meta_fields=list(_STATIC))
@dataclasses.dataclass(frozen=True)
class StAIConfig:
    """Structure (static) and loss weights / learning rate (leaves).

    Defaults are the authors' imputation configuration (``osmFISH_impute.yaml``):
    hidden 64, latent 16, 500 epochs, lr 0.002, weights recon 1, MMD 0.1, cos 1,
    impute 1, clf 0.1. The annotation configuration uses clf 10, impute 2 and 300 epochs.
    """

    n_genes: int
    n_classes: int
    hidden: int = 64
    latent: int = 16
    top_k: int = 50
    epochs: int = 500
    gat_heads: int = 1
    lam_recon: float = 1.0
    lam_mmd: float = 0.1
    lam_cos: float = 1.0
    lam_impute: float = 1.0
    lam_clf: float = 0.1
    learning_rate: float = 0.002

    @property
    def net(self) -> "StAINet":
        return StAINet(self.n_genes, self.n_classes, self.hidden, self.latent, self.gat_heads)


_normal = nn.initializers.normal(0.1)


def _dense(n, name):
    return nn.Dense(n, kernel_init=_normal, bias_init=_normal, name=name)


class StAINet(nn.Module):
    """Encoders, decoders and classifier (see the module docstring)."""

    n_genes: int
    n_classes: int
    hidden: int
    latent: int
    gat_heads: int = 1

    def setup(self):
        self.sp_in, self.sp_mid = _dense(self.hidden, "sp_in"), _dense(self.latent, "sp_mid")
        self.gat = GATConv(self.latent, heads=self.gat_heads, name="gat")
        self.sp_post = nn.Dense(self.latent, name="sp_post")
        self.ref_in, self.ref_out = _dense(self.hidden, "ref_in"), _dense(self.latent, "ref_out")
        self.dec_sp = [_dense(self.hidden, "dec_sp_h"), _dense(self.n_genes, "dec_sp_out")]
        self.dec_ref = [_dense(self.hidden, "dec_ref_h"), _dense(self.n_genes, "dec_ref_out")]
        self.clf_h, self.clf_out = nn.Dense(self.hidden, name="clf_h"), nn.Dense(self.n_classes, name="clf_out")

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

    def __call__(self, x1, neighbours, x2):
        z1, z2 = self.encode_spatial(x1, neighbours), self.encode_ref(x2)
        return {
            "z1": z1,
            "z2": z2,
            "x1_rec": self.decode_spatial(z1),
            "x2_rec": self.decode_ref(z2),
            "x1_cross": self.decode_ref(z1),
            "x2_cross": self.decode_spatial(z2),
            "logits2": self.classify(z2),
        }


class StAIData(NamedTuple):
    """Device arrays of one problem: ``x1`` [n1, G] scaled spatial expression,
    ``neighbours`` int32 [n1, k + 1], ``x2`` [n2, G] scaled reference expression,
    ``ref_values`` [n2, G] the reference expression the imputation averages (the
    authors: log-normalised, unscaled), ``labels`` int32 [n2]."""

    x1: jax.Array
    neighbours: jax.Array
    x2: jax.Array
    ref_values: jax.Array
    labels: jax.Array


def attention_weights(z_query, z_ref, top_k: int):
    """Softmax of negative Euclidean latent distances over the ``top_k`` nearest reference
    cells (zero elsewhere), ``[n_query, n_ref]``; every row sums to one."""
    sq = jnp.sum(z_query**2, 1)[:, None] + jnp.sum(z_ref**2, 1)[None, :] - 2.0 * z_query @ z_ref.T
    neg = -jnp.sqrt(jnp.maximum(sq, 0.0))
    k = min(top_k, z_ref.shape[0])
    vals, idx = jax.lax.top_k(neg, k)
    w = jax.nn.softmax(vals, axis=1)
    rows = jnp.arange(z_query.shape[0])[:, None]
    return jnp.zeros_like(neg).at[rows, idx].set(w)


def _masked_mse(a, b, gene_w):
    return jnp.sum(jnp.square(a - b) * gene_w) / (a.shape[0] * jnp.maximum(jnp.sum(gene_w), 1.0))


def loss_fn(cfg: StAIConfig, params, data: StAIData, fit_mask, cal_mask):
    """Total loss and its terms for one submodel (``fit_mask``/``cal_mask``: [G] 0/1)."""
    x1, x2 = data.x1 * fit_mask, data.x2 * fit_mask
    out = cfg.net.apply({"params": params}, x1, data.neighbours, x2)
    recon = _masked_mse(out["x1_rec"], x1, fit_mask) + _masked_mse(out["x2_rec"], x2, fit_mask)
    cos = jnp.mean(losses.cosine_consistence(out["x1_cross"] * fit_mask, x1)) + jnp.mean(
        losses.cosine_consistence(out["x2_cross"] * fit_mask, x2)
    )
    mmd = losses.mmd_rbf(out["z1"], out["z2"])
    w = attention_weights(out["z1"], out["z2"], cfg.top_k)
    pred = w @ data.x2  # calibration genes of the (scaled) reference, as the authors' training
    impute = losses.pearson_loss(pred, data.x1, cal_mask)
    clf = jnp.mean(losses.cross_entropy(out["logits2"], data.labels))
    total = (cfg.lam_recon * recon + cfg.lam_mmd * mmd + cfg.lam_cos * cos + cfg.lam_impute * impute
             + cfg.lam_clf * clf)
    return total, {"recon": recon, "mmd": mmd, "cos": cos, "impute": impute, "clf": clf}


def _fit_one(cfg: StAIConfig, key, data: StAIData, fit_mask, cal_mask):
    params = cfg.net.init(key, data.x1[:2], data.neighbours[:2] * 0, data.x2[:2])["params"]
    tx = optax.adam(cfg.learning_rate)
    grad = jax.value_and_grad(functools.partial(loss_fn, cfg), has_aux=True)

    def step(carry, _):
        p, s = carry
        (loss, terms), g = grad(p, data, fit_mask, cal_mask)
        upd, s = tx.update(g, s, p)
        return (optax.apply_updates(p, upd), s), {"loss": loss, **terms}

    (params, _), hist = jax.lax.scan(step, (params, tx.init(params)), None, length=cfg.epochs)
    return params, hist


@jax.jit
def fit_submodels(cfg: StAIConfig, keys, data: StAIData, fit_masks, cal_masks):
    """The ``k`` calibration submodels in one vmapped program.

    ``keys`` [k] PRNG keys; ``fit_masks``/``cal_masks`` [k, G] 0/1 gene masks (submodel
    ``j`` trains on ``fit_masks[j]`` and imputes ``cal_masks[j]``). Returns per-submodel
    parameters and the per-epoch loss terms (leading [k] axis).
    """
    return jax.vmap(_fit_one, in_axes=(None, 0, None, 0, 0))(cfg, keys, data, fit_masks, cal_masks)


@functools.partial(jax.jit, static_argnames=("chunk",))
def impute(cfg: StAIConfig, params, data: StAIData, fit_mask, values, chunk: int = 1024):
    """Imputed ``values`` (reference expression [n2, m] of the genes to impute) for every
    spatial cell, ``[n1, m]``, from one submodel. Chunked over spatial cells, so at most
    ``chunk x n2`` similarities exist at a time."""
    net = cfg.net
    z1 = net.apply({"params": params}, data.x1 * fit_mask, data.neighbours, method=StAINet.encode_spatial)
    z2 = net.apply({"params": params}, data.x2 * fit_mask, method=StAINet.encode_ref)
    n1 = z1.shape[0]
    size = min(chunk, n1)
    pad = (-n1) % size
    zp = jnp.concatenate([z1, jnp.zeros((pad, z1.shape[1]), z1.dtype)]).reshape(-1, size, z1.shape[1])
    out = jax.lax.map(lambda zc: attention_weights(zc, z2, cfg.top_k) @ values, zp)
    return out.reshape(-1, values.shape[1])[:n1]


@jax.jit
def annotate(cfg: StAIConfig, params, data: StAIData, fit_mask):
    """Class probabilities of the spatial cells from the classifier on their latent."""
    net = cfg.net
    z1 = net.apply({"params": params}, data.x1 * fit_mask, data.neighbours, method=StAINet.encode_spatial)
    return jax.nn.softmax(net.apply({"params": params}, z1, method=StAINet.classify), axis=-1)

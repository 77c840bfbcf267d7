"""MarkerMap and its neural baselines (Concrete VAE, Global-Gumbel VAE).

Gregory, Huang, ... & Villar, "MarkerMap: nonlinear marker selection for single-cell
studies", npj Syst Biol Appl (2024). One module covers the three differentiable
selectors the paper compares, which share the VAE / classifier body:

``selector="markermap"``
    An instance-wise logits network f_pi (two hidden blocks, dropout 0.5 between them)
    maps each cell of a minibatch to gene logits; their batch mean is folded into an
    exponential moving average across minibatches (``ema_decay = 0.95``, gradient through
    the current batch only), Gumbel noise is added, and the continuous top-k relaxation
    (Xie & Ermon 2019) gives a relaxed k-hot mask applied to the input. At inference the
    mask is the hard top-k of the averaged logits.
``selector="global_gumbel"``
    One global logit vector (a parameter, N(0, 1) initialised) with Gumbel top-k.
``selector="concrete"``
    The concrete selector layer of Abid et al. (2019): ``k`` rows of logits, each a
    Gumbel-softmax over genes; the encoder sees ``x @ W.T`` (``k`` inputs).

Body: encoder of ``encoder_layers`` hidden blocks (Linear, BatchNorm, LeakyReLU; the last
block without BatchNorm, as in the authors' code) with mean and log-variance heads,
latent 16; a Gaussian decoder (one hidden block, mean head) with a separate log-variance
decoder of the same shape; a classifier (one hidden block) on the latent *mean*.
Loss: ``alpha * (Gaussian NLL + kl_beta * KL) + (1 - alpha) * cross-entropy``, per-cell
means; ``alpha = 0`` supervised, ``1`` unsupervised, ``0.5`` joint.

Where the paper and the authors' package (``markermap`` 1.0.3) differ
--------------------------------------------------------------------
- Encoder depth: the paper describes two hidden layers; the package builds three
  (the third without batch norm). Default ``encoder_layers=2`` follows the paper;
  ``encoder_layers=3`` reproduces the package (the benchmark uses it for parity).
- Validation: the package samples ``z`` in its validation pass; we use ``z = mu`` so
  early stopping sees a deterministic loss.
- Early stopping: the package (Lightning) keeps the *last* parameters; we return the
  best-validation parameters (the issue's and the paper's intent).
- Concrete markers: the package ranks genes by a Gumbel-perturbed softmax even at
  inference; we rank by the noiseless column sums of the selection matrix, which gives
  exactly ``k`` distinct genes deterministically.
- Minibatches: the last incomplete batch of an epoch is dropped (static shapes); the
  package keeps it.

The f_pi output layer is applied to the batch-mean hidden activation instead of
averaging its outputs: the layer is affine, so ``mean(W h_i + b) = W mean(h_i) + b``
exactly, at ``1/batch_size`` of the cost. The masked first encoder layer uses a
backward pass that shares one matmul between the kernel and mask gradients
(:func:`jaxsel.nn.masked_matmul`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from .. import engine, losses
from ..nn.layers import Block, MaskedDense, TorchDense
from ..nn.selectors import concrete_weights, continuous_topk, gumbel_noise, hard_topk

__all__ = [
    "OBJECTIVES",
    "SELECTORS",
    "MarkerMapConfig",
    "MarkerMapNet",
    "MarkerMapResult",
    "default_hidden_size",
    "fit",
    "fit_folds",
    "fit_folds_checkpointed",
    "fit_stream",
    "make_data",
    "markers",
    "gene_scores",
    "predict_logits",
    "reconstruct",
    "embed",
]

SELECTORS = ("markermap", "global_gumbel", "concrete")
OBJECTIVES = {"supervised": 0.0, "unsupervised": 1.0, "joint": 0.5}
_STATIC = (
    "n_genes",
    "n_markers",
    "n_classes",
    "selector",
    "hidden_size",
    "latent_size",
    "encoder_layers",
    "batch_norm",
    "dropout_rate",
    "use_recon",
    "use_clf",
)
_LEAVES = (
    "alpha",
    "kl_beta",
    "ema_decay",
    "temperature",
    "temperature_decay",
    "min_temperature",
    "learning_rate",
)


def default_hidden_size(n_genes: int) -> int:
    """About a tenth of the gene count (the paper's rule), at least 16."""
    return max(16, int(round(n_genes / 10)))


# ----------------------------------------------------------------------------- config


@functools.partial(jax.tree_util.register_dataclass, data_fields=list(_LEAVES), meta_fields=list(_STATIC))
@dataclasses.dataclass(frozen=True)
class MarkerMapConfig:
    """MarkerMap-family model and objective.

    Structural fields (static: changing one recompiles) and continuous hyperparameters
    (pytree leaves: may carry a leading fold axis to sweep them in one program).

    Parameters
    ----------
    n_genes, n_markers : input genes and genes to select (``1 <= n_markers <= n_genes``).
    n_classes : number of cell types (needed when ``alpha < 1``).
    selector : one of ``"markermap"``, ``"global_gumbel"``, ``"concrete"``.
    hidden_size, latent_size, encoder_layers : body sizes (paper: hidden about n_genes/10,
        latent 16, two hidden encoder layers).
    batch_norm, dropout_rate : hidden-block batch norm; dropout inside f_pi.
    use_recon, use_clf : whether the VAE decoder / classifier exist (derived from alpha
        by :meth:`create`).
    alpha : trade-off, 0 supervised, 1 unsupervised.
    kl_beta : KL weight (0.1).
    ema_decay : beta of the running average of f_pi logits (0.95).
    temperature, temperature_decay, min_temperature : Gumbel temperature starts at
        ``temperature`` and is multiplied by ``temperature_decay`` each epoch, floored.
    learning_rate : Adam step size (ignored when the loop runs a range test).
    """

    n_genes: int
    n_markers: int
    n_classes: int = 0
    selector: str = "markermap"
    hidden_size: int = 256
    latent_size: int = 16
    encoder_layers: int = 2
    batch_norm: bool = True
    dropout_rate: float = 0.5
    use_recon: bool = False
    use_clf: bool = True
    alpha: float = 0.0
    kl_beta: float = 0.1
    ema_decay: float = 0.95
    temperature: float = 3.0
    temperature_decay: float = 0.95
    min_temperature: float = 1e-4
    learning_rate: float = 1e-3

    @classmethod
    def create(cls, n_genes: int, n_markers: int, *, alpha: float = 0.0, n_classes: int = 0, **kw):
        """Validated config; ``use_recon``/``use_clf`` follow from ``alpha``."""
        if not isinstance(n_genes, int) or n_genes < 1:
            raise ValueError(f"n_genes must be a positive integer, got {n_genes!r}")
        if isinstance(n_markers, bool) or not isinstance(n_markers, int) or not 1 <= n_markers <= n_genes:
            raise ValueError(f"n_markers must be an integer in [1, n_genes={n_genes}], got {n_markers!r}")
        alpha = float(alpha)
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        selector = kw.get("selector", "markermap")
        if selector not in SELECTORS:
            raise ValueError(f"selector must be one of {SELECTORS}, got {selector!r}")
        use_clf = alpha < 1.0
        if use_clf and n_classes < 2:
            raise ValueError(f"alpha={alpha} < 1 needs labels with at least 2 classes, got n_classes={n_classes}")
        if kw.get("hidden_size") is None:
            kw["hidden_size"] = default_hidden_size(n_genes)
        for name in ("hidden_size", "latent_size", "encoder_layers"):
            v = kw.get(name, 1)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        for name in ("temperature", "learning_rate"):
            if name in kw and not float(kw[name]) > 0:
                raise ValueError(f"{name} must be positive, got {kw[name]!r}")
        if "temperature_decay" in kw and not 0 < float(kw["temperature_decay"]) <= 1:
            raise ValueError(f"temperature_decay must be in (0, 1], got {kw['temperature_decay']!r}")
        if "ema_decay" in kw and not 0 < float(kw["ema_decay"]) < 1:
            raise ValueError(f"ema_decay must be in (0, 1), got {kw['ema_decay']!r}")
        return cls(
            n_genes=n_genes,
            n_markers=n_markers,
            n_classes=int(n_classes) if use_clf else 0,
            alpha=alpha,
            use_recon=alpha > 0.0,
            use_clf=use_clf,
            **kw,
        )

    # -- the engine's Method protocol ------------------------------------------------

    @property
    def net(self) -> "MarkerMapNet":
        return MarkerMapNet(**{k: getattr(self, k) for k in _STATIC})

    def init(self, key, data):
        x0 = data["x"][:2]
        k_params, k_drop = jax.random.split(key)
        variables = self.net.init({"params": k_params, "dropout": k_drop}, x0, method=MarkerMapNet.init_all)
        state = {"batch_stats": variables.get("batch_stats", {})}
        if self.selector == "markermap":
            state["ema"] = jnp.zeros((self.n_genes,), jnp.float32)
        return variables["params"], state

    def optimizer(self, learning_rate):
        return engine.adam(learning_rate)

    def epoch_context(self, epoch):
        t = self.temperature * self.temperature_decay ** epoch.astype(jnp.float32)
        return {"temperature": jnp.maximum(t, self.min_temperature)}

    def train_loss(self, params, model_state, batch, key, ctx):
        x = batch["x"]
        k_drop, k_gumbel, k_z = jax.random.split(key, 3)
        t = ctx["temperature"]
        stats = model_state["batch_stats"]
        new_state = dict(model_state)
        sel = {}
        if self.selector == "markermap":
            logits, upd = self.net.apply(
                {"params": params, "batch_stats": stats},
                x,
                True,
                method=MarkerMapNet.batch_logits,
                rngs={"dropout": k_drop},
                mutable=["batch_stats"],
            )
            stats = upd["batch_stats"]
            ema = self.ema_decay * jax.lax.stop_gradient(model_state["ema"]) + (1.0 - self.ema_decay) * logits
            new_state["ema"] = jax.lax.stop_gradient(ema)
            sel["mask"] = continuous_topk(ema + gumbel_noise(k_gumbel, ema.shape), self.n_markers, t)
        elif self.selector == "global_gumbel":
            g = params["logits"]
            sel["mask"] = continuous_topk(g + gumbel_noise(k_gumbel, g.shape), self.n_markers, t)
        else:
            sel["proj"] = concrete_weights(params["logits"], t, k_gumbel)
        eps = jax.random.normal(k_z, (x.shape[0], self.latent_size), x.dtype)
        out, upd = self.net.apply(
            {"params": params, "batch_stats": stats}, x, eps, True, **sel, mutable=["batch_stats"]
        )
        new_state["batch_stats"] = upd["batch_stats"]
        loss, metrics = self._loss(out, batch, None)
        return loss, (new_state, metrics)

    def eval_loss(self, params, model_state, batch, weights, ctx):
        idx = markers(self, params, model_state, ctx["temperature"])
        out = self.net.apply(
            {"params": params, "batch_stats": model_state["batch_stats"]}, batch["x"], None, False, idx=idx
        )
        return self._loss(out, batch, weights)

    def _loss(self, out, batch, weights):
        total = 0.0
        metrics = {}
        if self.use_recon:
            nll = losses.gaussian_nll(batch["x"], out["recon_mean"], out["recon_logvar"])
            kl = losses.kl_standard_normal(out["mean"], out["logvar"])
            recon = losses.weighted_mean(nll + self.kl_beta * kl, weights)
            metrics["recon"] = recon
            total = total + self.alpha * recon
        if self.use_clf:
            ce = losses.weighted_mean(losses.cross_entropy(out["class_logits"], batch["y"]), weights)
            hit = (jnp.argmax(out["class_logits"], -1) == batch["y"]).astype(jnp.float32)
            metrics["ce"] = ce
            metrics["accuracy"] = losses.weighted_mean(hit, weights)
            total = total + (1.0 - self.alpha) * ce
        return total, metrics


# ------------------------------------------------------------------------------ model


class MarkerMapNet(nn.Module):
    """Selector + VAE/classifier body (Flax Linen); see the module docstring."""

    n_genes: int
    n_markers: int
    n_classes: int
    selector: str
    hidden_size: int
    latent_size: int
    encoder_layers: int
    batch_norm: bool
    dropout_rate: float
    use_recon: bool
    use_clf: bool

    def setup(self):
        h, bn = self.hidden_size, self.batch_norm
        if self.selector == "markermap":
            self.pi_1 = Block(h, bn)
            self.pi_drop = nn.Dropout(self.dropout_rate)
            self.pi_2 = Block(h, bn)
            self.pi_out = TorchDense(self.n_genes)
        elif self.selector == "global_gumbel":
            self.logits = self.param("logits", nn.initializers.normal(1.0), (self.n_genes,))
        else:
            self.logits = self.param("logits", nn.initializers.normal(1.0), (self.n_markers, self.n_genes))
        in_bn = bn and self.encoder_layers > 1
        self.enc_in = (
            MaskedDense(h, use_bias=not in_bn) if self.selector != "concrete" else TorchDense(h, use_bias=not in_bn)
        )
        self.enc_in_bn = nn.BatchNorm(momentum=0.9, epsilon=1e-5) if in_bn else None
        # Blocks 2..L; the last hidden block has no batch norm (authors' encoder).
        self.enc_blocks = [
            Block(h, bn and i < self.encoder_layers - 1) for i in range(1, self.encoder_layers)
        ]
        self.enc_mean = TorchDense(self.latent_size)
        self.enc_logvar = TorchDense(self.latent_size)
        if self.use_recon:
            self.dec_mean_h = Block(h, bn)
            self.dec_mean_out = TorchDense(self.n_genes)
            self.dec_logvar_h = Block(h, bn)
            self.dec_logvar_out = TorchDense(self.n_genes)
        if self.use_clf:
            self.clf_h = Block(h, bn)
            self.clf_out = TorchDense(self.n_classes)

    def batch_logits(self, x, train: bool):
        """f_pi's gene logits averaged over the batch, ``[n_genes]``."""
        hdn = self.pi_1(x, train)
        hdn = self.pi_drop(hdn, deterministic=not train)
        hdn = nn.leaky_relu(self.pi_2(hdn, train), 0.01)
        return self.pi_out(jnp.mean(hdn, axis=0))

    def encode(self, x, train: bool, mask=None, idx=None, proj=None):
        if self.selector == "concrete":
            xs = jnp.take(x, idx, axis=1) if idx is not None else x @ proj.T
            hdn = self.enc_in(xs)
        else:
            hdn = self.enc_in(x, mask=mask, idx=idx)
        if self.enc_in_bn is not None:
            hdn = self.enc_in_bn(hdn, use_running_average=not train)
        hdn = nn.leaky_relu(hdn, 0.01)
        for block in self.enc_blocks:
            hdn = block(hdn, train)
        return self.enc_mean(hdn), self.enc_logvar(hdn)

    def __call__(self, x, eps, train: bool, mask=None, idx=None, proj=None):
        mean, logvar = self.encode(x, train, mask=mask, idx=idx, proj=proj)
        out = {"mean": mean, "logvar": logvar}
        if self.use_recon:
            z = mean if eps is None else mean + eps * jnp.exp(0.5 * logvar)
            out["recon_mean"] = self.dec_mean_out(self.dec_mean_h(z, train))
            out["recon_logvar"] = self.dec_logvar_out(self.dec_logvar_h(z, train))
        if self.use_clf:
            out["class_logits"] = self.clf_out(self.clf_h(mean, train))
        return out

    def init_all(self, x):
        if self.selector == "markermap":
            self.batch_logits(x, False)
        idx = jnp.arange(self.n_markers)
        return self(x, None, False, idx=idx)


# ------------------------------------------------------------------- fit and results


class MarkerMapResult(NamedTuple):
    """Fitted MarkerMap-family model.

    ``markers`` [..., n_markers] int32 gene indices (highest score first), ``scores``
    [..., n_genes] the selector's gene scores, plus the engine's :class:`FitResult`
    fields. A leading fold axis is present for fold-parallel fits.
    """

    markers: jax.Array
    scores: jax.Array
    params: dict
    model_state: dict
    history: dict
    best_epoch: jax.Array
    n_epochs: jax.Array
    learning_rate: jax.Array


def gene_scores(cfg: MarkerMapConfig, params, model_state, temperature=None):
    """[n_genes] scores whose top-k are the markers."""
    if cfg.selector == "markermap":
        return model_state["ema"]
    if cfg.selector == "global_gumbel":
        return params["logits"]
    t = cfg.min_temperature if temperature is None else temperature
    return jnp.sum(concrete_weights(params["logits"], t), axis=0)


def markers(cfg: MarkerMapConfig, params, model_state, temperature=None):
    """The ``n_markers`` distinct selected genes, ``[n_markers]`` int32."""
    return hard_topk(gene_scores(cfg, params, model_state, temperature), cfg.n_markers)


def _final_temperature(cfg: MarkerMapConfig, n_epochs):
    return cfg.epoch_context(jnp.maximum(n_epochs - 1, 0))["temperature"]


def _result(cfg: MarkerMapConfig, fr: engine.FitResult) -> MarkerMapResult:
    t = _final_temperature(cfg, fr.best_epoch + 1)
    scores = gene_scores(cfg, fr.params, fr.model_state, t)
    return MarkerMapResult(
        markers=hard_topk(scores, cfg.n_markers),
        scores=scores,
        params=fr.params,
        model_state=fr.model_state,
        history=fr.history,
        best_epoch=fr.best_epoch,
        n_epochs=fr.n_epochs,
        learning_rate=fr.learning_rate,
    )


def make_data(x, y=None):
    """The data pytree a fit reads: ``{"x": float32 [n_cells, n_genes], "y": int32 [n_cells]}``
    (``y`` zeros when unsupervised). Build it once to reuse device arrays across fits."""
    x = jnp.asarray(x, jnp.float32)
    y = jnp.zeros((x.shape[0],), jnp.int32) if y is None else jnp.asarray(y, jnp.int32)
    return {"x": x, "y": y}


def _as_data(x, y):
    return x if isinstance(x, dict) else make_data(x, y)


@functools.partial(jax.jit, static_argnames=("loop",))
def _fit_single(cfg, loop, key, data, split):
    return _result(cfg, engine.fit_one(cfg, loop, key, data, split))


def fit(cfg: MarkerMapConfig, loop: engine.LoopConfig, key, x, y, split: engine.Splits, *, lower: bool = False):
    """Fit one model in one compiled program.

    Parameters
    ----------
    cfg : :class:`MarkerMapConfig`.
    loop : :class:`jaxsel.engine.LoopConfig` (epochs, batch size, early stopping, LR finder).
    key : typed PRNG key.
    x : [n_cells, n_genes] preprocessed expression (or a :func:`make_data` dict, then
        ``y`` is ignored); y : [n_cells] int labels or None.
    split : single-fit :class:`jaxsel.engine.Splits` (train and validation indices).
    lower : return the lowered program instead (``.compile()`` it to time compilation
        separately; call the compiled object with ``(cfg, key, data, split)``).
    """
    args = (cfg, loop, key, _as_data(x, y), split)
    return _fit_single.lower(*args) if lower else _fit_single(*args)


def fit_checkpointed(cfg: MarkerMapConfig, loop: engine.LoopConfig, key, x, y, split: engine.Splits, *,
                     path, every: int, fingerprint: str) -> MarkerMapResult:
    """:func:`fit` in segments of ``every`` epochs, checkpointed to ``path`` after each
    and resumed from it when it exists (:func:`jaxsel.engine.fit_checkpointed`; the file
    must have been written for the same ``fingerprint``). Same result as :func:`fit`."""
    fr = engine.fit_checkpointed(cfg, loop, key, _as_data(x, y), split, path=path, every=every,
                                 fingerprint=fingerprint)
    return _result_program(cfg, fr)


@functools.partial(jax.jit, static_argnames=("loop", "batch_size", "mesh", "cfg_batched"))
def _fit_folds_program(cfg, loop, keys, data, splits, batch_size, mesh, cfg_batched):
    fr = engine.run_folds(cfg, loop, keys, data, splits, method_batched=cfg_batched, batch_size=batch_size, mesh=mesh)
    return jax.vmap(_result, in_axes=(0 if cfg_batched else None, 0))(cfg, fr)


def fit_folds(
    cfg: MarkerMapConfig,
    loop: engine.LoopConfig,
    keys,
    x,
    y,
    splits: engine.Splits,
    *,
    cfg_batched: bool = False,
    batch_size: int | None = None,
    mesh="auto",
    lower: bool = False,
) -> MarkerMapResult:
    """Fit every fold (or restart, or hyperparameter setting) in one compiled program.

    Same arguments as :func:`fit` with a leading fold axis on ``keys`` and ``splits``
    (and on ``cfg``'s leaves when ``cfg_batched``); ``batch_size`` and ``mesh`` as in
    :func:`jaxsel.engine.fit_folds`. Returns a :class:`MarkerMapResult` with a leading
    [n_folds] axis (markers and scores computed in the same program), or with
    ``lower=True`` the lowered program (call its compiled form with
    ``(cfg, keys, data, splits)``).
    """
    loop, mesh = engine.prepare_folds(loop, keys, splits, mesh)
    args = (cfg, loop, keys, _as_data(x, y), splits, batch_size, mesh, cfg_batched)
    return _fit_folds_program.lower(*args) if lower else _fit_folds_program(*args)


_result_program = jax.jit(_result)
_results_program = jax.jit(jax.vmap(_result, in_axes=(None, 0)))


def fit_folds_checkpointed(cfg: MarkerMapConfig, loop: engine.LoopConfig, keys, x, y, splits: engine.Splits, *,
                           path, every: int, fingerprint: str, batch_size: int | None = None,
                           mesh="auto") -> MarkerMapResult:
    """:func:`fit_folds` in segments of ``every`` epochs, every fold's state checkpointed
    to ``path`` after each and resumed from it when it exists
    (:func:`jaxsel.engine.fit_folds_checkpointed`). Same result as :func:`fit_folds` with
    the same ``batch_size`` and ``mesh``."""
    fr = engine.fit_folds_checkpointed(cfg, loop, keys, _as_data(x, y), splits, path=path, every=every,
                                       fingerprint=fingerprint, batch_size=batch_size, mesh=mesh)
    return _results_program(cfg, fr)


def fit_stream(cfg: MarkerMapConfig, loop: engine.LoopConfig, key, read, train_rows, val_rows, *, chunk_size: int,
               block_size: int | None = None, prefetch: int = 2, callback=None, checkpoint=None,
               checkpoint_every: int = 10, fingerprint: str = ""):
    """Fit one model on cells streamed from the host (data larger than memory).

    ``read(rows)`` returns the :func:`make_data` dict of the (sorted) rows ``rows`` as
    numpy arrays, ``{"x": float32 [len(rows), n_genes], "y": int32 [len(rows)]}``;
    ``train_rows`` / ``val_rows`` are the rows to train and validate on (the latter are
    read once and kept on the device). Training runs chunk by chunk through
    :func:`jaxsel.engine.fit_stream` (one compiled program per chunk shape, chunk-local
    shuffling; see there). The learning-rate range test, when ``loop`` asks for it, runs
    on the first chunk. ``checkpoint`` / ``checkpoint_every`` / ``fingerprint``: a
    checkpoint file of the loop state, resumed bit for bit (see
    :func:`jaxsel.engine.fit_stream`).

    Returns ``(MarkerMapResult, info)`` with the engine's host-side timing ``info``.
    """
    out = engine.fit_stream(cfg, loop, key, read, train_rows, val_rows, chunk_size=chunk_size,
                            block_size=block_size, prefetch=prefetch, callback=callback, checkpoint=checkpoint,
                            checkpoint_every=checkpoint_every, fingerprint=fingerprint)
    return _result_program(cfg, out.result), out.info


@jax.jit
def _apply_eval(cfg, params, model_state, x, idx):
    return cfg.net.apply({"params": params, "batch_stats": model_state["batch_stats"]}, x, None, False, idx=idx)


def predict_logits(cfg: MarkerMapConfig, result: MarkerMapResult, x, chunk: int = 4096):
    """Class logits of the fitted classifier from the markers only, [n_cells, n_classes]."""
    if not cfg.use_clf:
        raise ValueError("this model has no classifier (alpha == 1, unsupervised)")
    fn = lambda xc: _apply_eval(cfg, result.params, result.model_state, xc, result.markers)["class_logits"]  # noqa: E731
    return engine.chunked(fn, jnp.asarray(x, jnp.float32), chunk)


def reconstruct(cfg: MarkerMapConfig, result: MarkerMapResult, x, chunk: int = 4096):
    """Decoder mean of all genes from the markers only, [n_cells, n_genes]."""
    if not cfg.use_recon:
        raise ValueError("this model has no decoder (alpha == 0, supervised)")
    fn = lambda xc: _apply_eval(cfg, result.params, result.model_state, xc, result.markers)["recon_mean"]  # noqa: E731
    return engine.chunked(fn, jnp.asarray(x, jnp.float32), chunk)


def embed(cfg: MarkerMapConfig, result: MarkerMapResult, x, chunk: int = 4096):
    """Latent mean from the markers only, [n_cells, latent_size]."""
    fn = lambda xc: _apply_eval(cfg, result.params, result.model_state, xc, result.markers)["mean"]  # noqa: E731
    return engine.chunked(fn, jnp.asarray(x, jnp.float32), chunk)

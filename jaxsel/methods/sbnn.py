"""Sparse bottleneck neural networks (sBNN).

Bernaerts, Berens & Kobak, "Sparse bottleneck neural networks for exploratory non-linear
visualization of Patch-seq data" (2022). A network predicts a paired modality ``Y``
(electrophysiology, surface proteins) from genes ``X`` through a two-dimensional linear
bottleneck; a group lasso on the first layer's rows selects genes; the first layer is
then pruned to exactly ``n_selected`` genes and the network fine-tuned without the lasso
(the "relaxed" procedure). The 2-D latent is the picture.

Model
-----
Encoder ``G -> 512 -> 128 -> 2`` (ELU, linear bottleneck), decoder ``2 -> 128 -> 512``
(ELU) with three heads on the last decoder layer or the latent:

- ``regr``: linear ``512 -> q``, the "alloencoder" prediction of ``Y``;
- ``clf``: ``512 -> n_clusters`` logits, used only for pre-training;
- ``ae``: its own ``2 -> 128 -> 512 -> n_selected`` decoder (initialised from the
  regression decoder) reconstructing the selected genes from the frozen latent, so that
  gene expression can be drawn over the latent.

Glorot-uniform kernels and zero biases (Keras defaults). Loss: mean squared error (or
cross-entropy for pre-training) ``+ lasso * sum_g ||W1_g||_2 + l2 * sum ||W||^2`` over the
layers a stage trains (the l2 term is 1e-10, kept for parity).

Schedule (the paper's; every stage is one :func:`jaxsel.engine.fit_one` inside the same
compiled program, a fresh Adam per stage as Keras' recompilation gives):

1. ``pretrain_epochs`` (50): classifier on k-means clusters of the training ``Y``
   (K = 20, clusters with fewer than 10 cells left out), early stopping on a 40 %
   held-out part of the training set; the best-validation parameters are kept;
2. ``frozen_epochs`` (50): regression head, the bottom two layers frozen, lr 1e-4;
3. ``unfrozen_epochs`` (50): all layers, lr 5e-5;
4. pruning: the ``n_selected`` (25) rows of the first layer with the largest l2 norm
   are kept; the first kernel becomes ``[n_selected, 512]`` and the input those genes;
5. ``finetune_epochs`` (100): all layers, lasso 0, lr 5e-5;
6. ``ae_epochs`` (100; 0 to skip): the autoencoder head on the frozen latent.

Freezing and stage membership are optax transformations
(``optax.multi_transform`` with ``optax.set_to_zero`` for frozen layers), not
hand-written update code. ``schedule="straight"`` (the paper's comparison without
pre-training) trains all layers for 100 epochs at lr 1e-4 before pruning.

Where we differ from the authors' Keras code
--------------------------------------------
- The authors use the CV *test* fold as Keras' validation data and report the test R^2
  of the checkpoint with the best validation (= test) loss after pruning. We report the
  R^2 of the *final* parameters; the per-epoch test curve is returned so the authors'
  number (its maximum over the fine-tuning epochs) can be computed, and the benchmark
  reports both.
- Pre-training returns its best-validation parameters (the issue's "early stopping");
  the authors' code carries the *last* pre-training weights forward.
- k-means runs on each fold's training ``Y`` (host side, scikit-learn); the authors
  cluster all cells once.
- The last incomplete minibatch of an epoch is dropped (static shapes); Keras keeps it.
- Train R^2 per epoch is the ratio of the sums over the epoch's minibatches (Keras
  averages per-batch R^2 values).

R^2 follows the paper: ``1 - sum((y - y_hat)^2) / sum(y^2)`` with ``Y`` centred by the
training mean, over all cells and features (and per feature).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from .. import engine, losses
from ..nn.selectors import hard_topk

__all__ = [
    "SCHEDULES",
    "FitCheckpoint",
    "SparseBottleneckConfig",
    "SparseBottleneckNet",
    "SparseBottleneckResult",
    "make_data",
    "fit",
    "fit_checkpointed",
    "fit_folds",
    "fit_folds_checkpointed",
    "fit_stream",
    "predict",
    "latent",
    "reconstruct_genes",
    "row_norms",
    "init_params",
]

SCHEDULES = ("pretrain_freeze", "straight", "pretrain_straight")

_STATIC = (
    "n_genes",
    "n_outputs",
    "n_selected",
    "n_clusters",
    "hidden",
    "latent_size",
    "pretrain_epochs",
    "frozen_epochs",
    "unfrozen_epochs",
    "finetune_epochs",
    "ae_epochs",
    "batch_size",
    "pretrain_patience",
)
_LEAVES = (
    "lasso",
    "l2",
    "learning_rate",
    "unfrozen_learning_rate",
    "finetune_learning_rate",
    "ae_learning_rate",
)


# ----------------------------------------------------------------------------- config


@functools.partial(jax.tree_util.register_dataclass, data_fields=list(_LEAVES), meta_fields=list(_STATIC))
@dataclasses.dataclass(frozen=True)
class SparseBottleneckConfig:
    """Sparse bottleneck network and its training schedule.

    Structural fields (static; changing one recompiles) and the penalties and learning
    rates (pytree leaves; they may carry a leading fold axis to sweep them in one
    program). Build with :meth:`create`, which validates and applies a schedule preset.

    Parameters
    ----------
    n_genes, n_outputs : input genes ``G`` and predicted features ``q``.
    n_selected : genes kept by pruning (25).
    n_clusters : k-means clusters of ``Y`` for pre-training (20).
    hidden, latent_size : encoder widths (512, 128) and bottleneck size (2); the decoder
        mirrors the encoder.
    pretrain_epochs, frozen_epochs, unfrozen_epochs, finetune_epochs, ae_epochs : stage
        lengths (0 skips a stage; see the module docstring).
    batch_size : cells per Adam step (32).
    pretrain_patience : early-stopping patience of the pre-training stage.
    lasso, l2 : group-lasso weight on the first layer (0.1) and ridge on all layers (1e-10).
    learning_rate : Adam rate of pre-training and the frozen stage (1e-4).
    unfrozen_learning_rate, finetune_learning_rate, ae_learning_rate : later stages (5e-5).
    """

    n_genes: int
    n_outputs: int
    n_selected: int = 25
    n_clusters: int = 20
    hidden: tuple = (512, 128)
    latent_size: int = 2
    pretrain_epochs: int = 50
    frozen_epochs: int = 50
    unfrozen_epochs: int = 50
    finetune_epochs: int = 100
    ae_epochs: int = 100
    batch_size: int = 32
    pretrain_patience: int = 10
    lasso: float = 0.1
    l2: float = 1e-10
    learning_rate: float = 1e-4
    unfrozen_learning_rate: float = 5e-5
    finetune_learning_rate: float = 5e-5
    ae_learning_rate: float = 5e-5

    @classmethod
    def create(cls, n_genes: int, n_outputs: int, *, schedule: str = "pretrain_freeze", **kw):
        """Validated config.

        ``schedule`` presets (explicit keyword arguments override them):

        - ``"pretrain_freeze"`` (the paper's final procedure): pre-training 50, frozen 50
          at ``learning_rate``, unfrozen 50 at half of it, prune, fine-tune 100;
        - ``"straight"`` (no pre-training): all layers 100 epochs at ``learning_rate``,
          prune, fine-tune 100 at half of it;
        - ``"pretrain_straight"``: pre-training, then as ``"straight"``.
        """
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
        for name, v in (("n_genes", n_genes), ("n_outputs", n_outputs)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        lr = float(kw.get("learning_rate", 1e-4))
        preset = {}
        if schedule != "pretrain_freeze":
            preset = dict(frozen_epochs=0, unfrozen_epochs=100, unfrozen_learning_rate=lr)
            if schedule == "straight":
                preset["pretrain_epochs"] = 0
        preset.update(kw)
        preset.setdefault("unfrozen_learning_rate", lr / 2)
        preset.setdefault("finetune_learning_rate", lr / 2)
        preset.setdefault("ae_learning_rate", lr / 2)
        n_sel = preset.get("n_selected", 25)
        if isinstance(n_sel, bool) or not isinstance(n_sel, int) or not 1 <= n_sel <= n_genes:
            raise ValueError(f"n_selected must be an integer in [1, n_genes={n_genes}], got {n_sel!r}")
        hidden = tuple(preset.get("hidden", (512, 128)))
        if not hidden or any(isinstance(h, bool) or not isinstance(h, int) or h < 1 for h in hidden):
            raise ValueError(f"hidden must be a non-empty tuple of positive integers, got {hidden!r}")
        preset["hidden"] = hidden
        for name in ("n_clusters", "latent_size", "batch_size", "pretrain_patience"):
            v = preset.get(name, 2)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if preset.get("n_clusters", 20) < 2:
            raise ValueError("n_clusters must be at least 2")
        for name in ("pretrain_epochs", "frozen_epochs", "unfrozen_epochs", "finetune_epochs", "ae_epochs"):
            v = preset.get(name, 0)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {v!r}")
        if preset.get("frozen_epochs", 50) + preset.get("unfrozen_epochs", 50) < 1:
            raise ValueError("frozen_epochs + unfrozen_epochs must be at least 1 (the genes are chosen after them)")
        for name in ("lasso", "l2"):
            if name in preset and not float(preset[name]) >= 0:
                raise ValueError(f"{name} must be non-negative, got {preset[name]!r}")
        for name in _LEAVES[2:]:
            if not float(preset.get(name, lr)) > 0:
                raise ValueError(f"{name} must be positive, got {preset.get(name)!r}")
        return cls(n_genes=n_genes, n_outputs=n_outputs, **preset)

    @property
    def net(self) -> "SparseBottleneckNet":
        return SparseBottleneckNet(
            hidden=self.hidden,
            latent_size=self.latent_size,
            n_outputs=self.n_outputs,
            n_clusters=self.n_clusters,
            n_selected=self.n_selected,
        )

    @property
    def n_epochs(self) -> int:
        """Regression epochs recorded in the history (frozen + unfrozen + fine-tune)."""
        return self.frozen_epochs + self.unfrozen_epochs + self.finetune_epochs


# ------------------------------------------------------------------------------ model


def _dense(n: int, name: str) -> nn.Dense:
    return nn.Dense(n, kernel_init=nn.initializers.glorot_uniform(), bias_init=nn.initializers.zeros, name=name)


class SparseBottleneckNet(nn.Module):
    """Encoder, bottleneck, decoder and the three heads (see the module docstring).

    Layer names are the parameter keys: ``enc_0`` (the gene layer with the group lasso),
    ``enc_1``..., ``bottleneck``, ``dec_*``, ``regr``, ``clf``, ``ae_*``, ``ae_out``.
    """

    hidden: tuple
    latent_size: int
    n_outputs: int
    n_clusters: int
    n_selected: int

    def setup(self):
        self.enc = [_dense(h, f"enc_{i}") for i, h in enumerate(self.hidden)]
        self.bottleneck = _dense(self.latent_size, "bottleneck")
        widths = self.hidden[::-1]
        self.dec = [_dense(h, f"dec_{i}") for i, h in enumerate(widths)]
        self.regr = _dense(self.n_outputs, "regr")
        self.clf = _dense(self.n_clusters, "clf")
        self.ae = [_dense(h, f"ae_{i}") for i, h in enumerate(widths)]
        self.ae_out = _dense(self.n_selected, "ae_out")

    def encode(self, x):
        for layer in self.enc:
            x = nn.elu(layer(x))
        return self.bottleneck(x)

    def decode(self, z):
        for layer in self.dec:
            z = nn.elu(layer(z))
        return z

    def __call__(self, x, head: str = "regr"):
        z = self.encode(x)
        if head == "latent":
            return z
        if head == "ae":
            for layer in self.ae:
                z = nn.elu(layer(z))
            return self.ae_out(z)
        h = self.decode(z)
        return self.clf(h) if head == "clf" else self.regr(h)

    def init_all(self, x):
        return self(x, "regr"), self(x, "clf"), self(x, "ae")


def init_params(cfg: "SparseBottleneckConfig", key) -> dict:
    """Initial parameters of every layer (Glorot-uniform kernels, zero biases)."""
    x = jnp.zeros((1, cfg.n_genes), jnp.float32)
    return cfg.net.init(key, x, method=SparseBottleneckNet.init_all)["params"]


def row_norms(params):
    """l2 norm of each gene's outgoing weights in the first layer, ``[n_input_genes]``."""
    return jnp.sqrt(jnp.sum(jnp.square(params["enc_0"]["kernel"]), axis=1))


def _penalty(params, trainable, lasso, l2):
    """``lasso * group_lasso(first kernel) + l2 * sum of squares`` over trained layers.

    Output biases (``regr``, ``ae_out``) are not penalised, as in the authors' code.
    """
    total = jnp.asarray(0.0, jnp.float32)
    for name in trainable:
        for pname, w in params[name].items():
            if pname == "bias" and name in ("regr", "ae_out"):
                continue
            total = total + l2 * jnp.sum(jnp.square(w))
    if "enc_0" in trainable:
        total = total + lasso * losses.group_lasso(params["enc_0"]["kernel"], axis=1)
    return total


# --------------------------------------------------------------------------- stages


_STAGE_STATIC = ("net", "task", "trainable")
_STAGE_LEAVES = ("learning_rate", "lasso", "l2", "x_mean", "y_mean", "genes")


@functools.partial(jax.tree_util.register_dataclass, data_fields=list(_STAGE_LEAVES), meta_fields=list(_STAGE_STATIC))
@dataclasses.dataclass(frozen=True)
class _Stage:
    """One stage of the schedule, in the engine's Method protocol.

    ``task``: ``"clf"`` (cross-entropy on ``data["c"]``), ``"regr"`` (MSE on centred
    ``Y``) or ``"ae"`` (MSE on the centred selected genes). ``trainable``: top-level
    parameter names this stage updates; the rest are frozen by the optimiser.
    ``genes``: the selected gene indices after pruning (``None`` before).
    """

    net: SparseBottleneckNet
    task: str
    trainable: tuple
    learning_rate: jax.Array
    lasso: jax.Array
    l2: jax.Array
    x_mean: jax.Array
    y_mean: jax.Array
    genes: jax.Array | None

    def init(self, key, data):  # pragma: no cover - stages always start from given params
        raise NotImplementedError

    def optimizer(self, learning_rate):
        def label(params):
            return {k: jax.tree.map(lambda _: "train" if k in self.trainable else "freeze", v) for k, v in params.items()}

        return optax.multi_transform({"train": optax.adam(learning_rate), "freeze": optax.set_to_zero()}, label)

    def epoch_context(self, epoch):
        return {}

    def _inputs(self, batch):
        x = batch["x"]
        mean = self.x_mean
        if self.genes is not None:
            x = jnp.take(x, self.genes, axis=1)
            mean = jnp.take(mean, self.genes)
        return x - mean

    def _forward(self, params, batch):
        x = self._inputs(batch)
        if self.task == "clf":
            logits = self.net.apply({"params": params}, x, "clf")
            return logits, batch["c"]
        if self.task == "ae":
            return self.net.apply({"params": params}, x, "ae"), x
        return self.net.apply({"params": params}, x, "regr"), batch["y"] - self.y_mean

    def train_loss(self, params, model_state, batch, key, ctx):
        out, target = self._forward(params, batch)
        if self.task == "clf":
            loss = jnp.mean(losses.cross_entropy(out, target))
            aux = {"accuracy": jnp.mean(jnp.argmax(out, -1) == target)}
        else:
            sq = jnp.square(target - out)
            loss = jnp.mean(sq)
            aux = {"sse": jnp.sum(sq), "sst": jnp.sum(jnp.square(target))}
        return loss + _penalty(params, self.trainable, self.lasso, self.l2), (model_state, aux)

    def eval_loss(self, params, model_state, batch, weights, ctx):
        out, target = self._forward(params, batch)
        if self.task == "clf":
            ce = losses.cross_entropy(out, target)
            acc = (jnp.argmax(out, -1) == target).astype(jnp.float32)
            return losses.weighted_mean(ce, weights), {"accuracy": losses.weighted_mean(acc, weights)}
        w = weights[:, None]
        sq = jnp.square(target - out) * w
        tot = jnp.square(target) * w
        per_res, per_tot = jnp.sum(sq, axis=0), jnp.sum(tot, axis=0)
        mse = jnp.sum(per_res) / jnp.maximum(jnp.sum(weights) * out.shape[1], 1.0)
        return mse, {
            "r2": 1.0 - jnp.sum(per_res) / jnp.sum(per_tot),
            "r2_per_feature": 1.0 - per_res / per_tot,
        }


def _loop(epochs: int, batch_size: int, steps: int, patience=None, progress=None) -> engine.LoopConfig:
    return engine.LoopConfig(
        max_epochs=epochs, batch_size=batch_size, min_epochs=1, patience=patience, steps_per_epoch=steps,
        progress=progress,
    )


class _Loops(NamedTuple):
    """Static per-stage loop settings (hashable)."""

    pretrain: engine.LoopConfig | None
    frozen: engine.LoopConfig | None
    unfrozen: engine.LoopConfig | None
    finetune: engine.LoopConfig | None
    ae: engine.LoopConfig | None


def _make_loops(cfg: SparseBottleneckConfig, n_train_min: int, n_pretrain_min: int, progress=None) -> _Loops:
    """Per-stage loops; ``progress``: a label, printed with each stage's name."""
    bs = cfg.batch_size
    label = lambda stage: None if progress is None else f"{progress} {stage}"  # noqa: E731
    if n_train_min < bs:
        raise ValueError(
            f"batch_size ({bs}) is larger than the smallest training set ({n_train_min} cells); lower batch_size"
        )
    steps = n_train_min // bs
    pre = None
    if cfg.pretrain_epochs:
        if n_pretrain_min < bs:
            raise ValueError(
                f"the pre-training set ({n_pretrain_min} cells) is smaller than batch_size ({bs}); "
                "lower batch_size or use schedule='straight'"
            )
        pre = _loop(cfg.pretrain_epochs, bs, n_pretrain_min // bs, patience=cfg.pretrain_patience,
                    progress=label("pretrain"))
    mk = lambda e, stage: _loop(e, bs, steps, progress=label(stage)) if e else None  # noqa: E731
    return _Loops(pre, mk(cfg.frozen_epochs, "frozen"), mk(cfg.unfrozen_epochs, "unfrozen"),
                  mk(cfg.finetune_epochs, "finetune"), mk(cfg.ae_epochs, "ae"))


# ------------------------------------------------------------------- fit and results


class SparseBottleneckResult(NamedTuple):
    """A fitted sparse bottleneck network (leading fold axis for fold-parallel fits).

    ``genes`` int32 [n_selected]: selected genes, largest first-layer row norm first.
    ``params``: the pruned network (first kernel ``[n_selected, hidden[0]]``).
    ``x_mean``, ``y_mean``: the training means the model centres its inputs and
    outputs with. ``gene_norms`` [n_genes]: first-layer row norms at pruning.
    ``history``: per regression epoch (frozen + unfrozen + fine-tune) ``train_r2``,
    ``test_r2``, ``test_r2_per_feature`` [.., q], ``train_loss``, ``test_loss``; the
    pre-training stage's ``pretrain_train_loss``, ``pretrain_val_loss``,
    ``pretrain_val_accuracy``; and ``ae_train_r2``/``ae_test_r2`` of the autoencoder
    head. Entries for epochs not run are NaN.
    ``pretrain_best_epoch``: the pre-training epoch whose parameters were kept (-1 if
    no pre-training).
    """

    genes: jax.Array
    gene_norms: jax.Array
    params: dict
    x_mean: jax.Array
    y_mean: jax.Array
    history: dict
    pretrain_best_epoch: jax.Array


def make_data(x, y, clusters=None):
    """The data pytree of a fit: ``{"x": float32 [n, G], "y": float32 [n, q], "c": int32 [n]}``.

    ``clusters`` are the pre-training class labels (k-means of ``Y``); zeros when absent.
    Negative labels (cells outside a fold's training set, as
    :func:`jaxsel.preprocessing.pretraining_clusters` marks them) are never read.
    """
    x = jnp.asarray(x, jnp.float32)
    y = jnp.asarray(y, jnp.float32)
    c = jnp.zeros((x.shape[0],), jnp.int32) if clusters is None else jnp.maximum(jnp.asarray(clusters, jnp.int32), 0)
    return {"x": x, "y": y, "c": c}


def _regression_history(h: dict) -> dict:
    return {
        "train_loss": h["train_loss"],
        "test_loss": h["val_loss"],
        "train_r2": 1.0 - h["train_sse"] / h["train_sst"],
        "test_r2": h["val_r2"],
        "test_r2_per_feature": h["val_r2_per_feature"],
    }


_STAGES = ("pretrain", "frozen", "unfrozen", "finetune", "ae")
_PRUNED = ("finetune", "ae")  # stages that train the pruned network


def _stage_keys(key):
    """Keys of initialisation and the five stages (initialisation key first)."""
    return jax.random.split(key, 6)


def _present(loops: _Loops) -> tuple:
    """Names of the stages this schedule runs, in order."""
    return tuple(n for n in _STAGES if getattr(loops, n) is not None)


def _begin(cfg: SparseBottleneckConfig, key, data, split: engine.Splits):
    """``(x_mean, y_mean, initial parameters)`` of one fold."""
    x_mean = engine.valid_mean(jnp.take(data["x"], split.train_idx, axis=0), split.n_train)
    y_mean = engine.valid_mean(jnp.take(data["y"], split.train_idx, axis=0), split.n_train)
    return x_mean, y_mean, init_params(cfg, _stage_keys(key)[0])


def _stage_method(cfg: SparseBottleneckConfig, name: str, x_mean, y_mean, genes=None) -> _Stage:
    """The engine method of stage ``name`` (``genes``: the pruned stages' selection)."""
    enc = tuple(f"enc_{i}" for i in range(len(cfg.hidden)))
    dec = tuple(f"dec_{i}" for i in range(len(cfg.hidden)))
    body = (*enc, "bottleneck", *dec)
    task, trainable, lr, lasso = {
        "pretrain": ("clf", (*body, "clf"), cfg.learning_rate, cfg.lasso),
        "frozen": ("regr", (*body[2:], "regr"), cfg.learning_rate, cfg.lasso),
        "unfrozen": ("regr", (*body, "regr"), cfg.unfrozen_learning_rate, cfg.lasso),
        "finetune": ("regr", (*body, "regr"), cfg.finetune_learning_rate, 0.0),
        "ae": ("ae", (*(f"ae_{i}" for i in range(len(cfg.hidden))), "ae_out"), cfg.ae_learning_rate, 0.0),
    }[name]
    return _Stage(cfg.net, task=task, trainable=trainable, learning_rate=lr, lasso=lasso, l2=cfg.l2,
                  x_mean=x_mean, y_mean=y_mean, genes=genes if name in _PRUNED else None)


def _prune(cfg: SparseBottleneckConfig, params):
    """``(genes, norms, pruned parameters)``: keep the ``n_selected`` rows of the first
    kernel with the largest norms."""
    norms = row_norms(params)
    genes = hard_topk(norms, cfg.n_selected).astype(jnp.int32)
    params = dict(params)
    params["enc_0"] = {"kernel": jnp.take(params["enc_0"]["kernel"], genes, axis=0), "bias": params["enc_0"]["bias"]}
    return genes, norms, params


def _stage_start_params(cfg: SparseBottleneckConfig, name: str, params):
    """What stage ``name`` starts from: the autoencoder head starts from the trained
    regression decoder (the paper)."""
    if name != "ae":
        return params
    params = dict(params)
    for i in range(len(cfg.hidden)):
        params[f"ae_{i}"] = params[f"dec_{i}"]
    return params


def _stage_key(name: str, key):
    """The key of stage ``name``."""
    return dict(zip(_STAGES, _stage_keys(key)[1:]))[name]


def _stage_args(name: str, key, split, pre_split):
    """``(key, split)`` of stage ``name``."""
    return _stage_key(name, key), (pre_split if name == "pretrain" else split)


def _assemble(genes, norms, params, x_mean, y_mean, hists: dict, pre_best) -> SparseBottleneckResult:
    """The result from the stages' histories (``hists``: name -> engine history)."""
    hist = {}
    if "pretrain" in hists:
        hist["pretrain_train_loss"] = hists["pretrain"]["train_loss"]
        hist["pretrain_val_loss"] = hists["pretrain"]["val_loss"]
        hist["pretrain_val_accuracy"] = hists["pretrain"]["val_accuracy"]
    parts = [_regression_history(hists[n]) for n in ("frozen", "unfrozen", "finetune") if n in hists]
    hist.update({k: jnp.concatenate([p[k] for p in parts]) for k in parts[0]})
    if "ae" in hists:
        hist["ae_train_r2"] = 1.0 - hists["ae"]["train_sse"] / hists["ae"]["train_sst"]
        hist["ae_test_r2"] = hists["ae"]["val_r2"]
    return SparseBottleneckResult(genes, norms, params, x_mean, y_mean, hist, pre_best)


def _schedule(cfg: SparseBottleneckConfig, loops: _Loops, key, x_mean, y_mean, params, run_stage):
    """The stages in order from ``params``, pruning before the first pruned stage (or at
    the end): ``run_stage(name, method, stage_key, start_params)`` trains one stage and
    returns its :class:`~jaxsel.engine.FitResult` (in one program, or streamed)."""
    hists, pre_best, pruned = {}, jnp.asarray(-1, jnp.int32), None
    for name in _present(loops):
        if name in _PRUNED and pruned is None:
            genes, norms, params = pruned = _prune(cfg, params)
        m = _stage_method(cfg, name, x_mean, y_mean, None if pruned is None else pruned[0])
        fr = run_stage(name, m, _stage_key(name, key), _stage_start_params(cfg, name, params))
        params, hists[name] = fr.params, fr.history
        if name == "pretrain":
            pre_best = fr.best_epoch
    if pruned is None:
        genes, norms, params = _prune(cfg, params)
    return _assemble(genes, norms, params, x_mean, y_mean, hists, pre_best)


def _fit_one(cfg: SparseBottleneckConfig, loops: _Loops, key, data, split: engine.Splits, pre_split: engine.Splits):
    """The whole schedule for one fold (traceable; ``data["c"]`` may be per fold)."""
    x_mean, y_mean, params = _begin(cfg, key, data, split)

    def run(name, m, k, start):
        sp = pre_split if name == "pretrain" else split
        return engine.fit_one(m, getattr(loops, name), k, data, sp, params=(start, {}))

    return _schedule(cfg, loops, key, x_mean, y_mean, params, run)


@functools.partial(jax.jit, static_argnames=("loops",))
def _fit_single(cfg, loops, key, data, split, pre_split):
    return _fit_one(cfg, loops, key, data, split, pre_split)


def fit(cfg: SparseBottleneckConfig, key, data: dict, split: engine.Splits, pre_split: engine.Splits | None = None,
        *, lower: bool = False, progress: str | None = None) -> SparseBottleneckResult:
    """Fit the whole schedule for one split in one compiled program.

    Parameters
    ----------
    cfg : :class:`SparseBottleneckConfig`.
    key : typed PRNG key.
    data : :func:`make_data` dict (``"c"``: pre-training cluster labels).
    split : single-fit :class:`jaxsel.engine.Splits`; ``val_idx`` are the cells whose
        R^2 is tracked per epoch (the CV test fold; never used for training or stopping).
    pre_split : pre-training train / held-out cells (required when
        ``cfg.pretrain_epochs > 0``).
    lower : return the lowered program instead (``.compile()`` to time compilation).
    progress : a label to print a progress line under, per stage and epoch
        (:mod:`jaxsel.engine.progress`); ``None`` prints nothing.
    """
    if cfg.pretrain_epochs and pre_split is None:
        raise ValueError("cfg.pretrain_epochs > 0 needs pre_split (the pre-training train / held-out cells)")
    pre_split = split if pre_split is None else pre_split
    loops = _make_loops(cfg, int(split.n_train), int(pre_split.n_train), progress)
    args = (cfg, loops, key, data, split, pre_split)
    return _fit_single.lower(*args) if lower else _fit_single(*args)


def fit_stream(cfg: SparseBottleneckConfig, key, read, train_rows, val_rows, x_mean, y_mean, *, pre_rows=None,
               chunk_size: int, block_size: int | None = None, prefetch: int = 2, progress: str | None = None,
               checkpoint=None, checkpoint_every: int = 10, fingerprint: str = ""):
    """The whole schedule on cells streamed from the host (``X`` larger than memory).

    Every stage runs :func:`jaxsel.engine.fit_stream` from the parameters the previous
    stage (or pruning) left, with the same stage methods, keys and pruning as
    :func:`fit`; the differences are the streamed loop's (an epoch is one pass over
    ``train_rows`` in chunks, minibatches shuffled within a chunk), so the result is a
    fit of the same model, not the same numbers.

    Parameters
    ----------
    read : host function ``read(rows) -> {"x": float32 [len(rows), G], "y": float32
        [len(rows), q], "c": int32 [len(rows)]}`` (``c``: pre-training cluster labels,
        zeros without pre-training) of the sorted rows ``rows``.
    train_rows, val_rows : rows to train on and to track R^2 on (read once, kept on
        the device: at most ``chunk_size`` of them, so that R^2 is one evaluation).
    x_mean, y_mean : the training means the model centres with ([G], [q]).
    pre_rows : ``(train, held-out)`` rows of pre-training (required when
        ``cfg.pretrain_epochs > 0``; the held-out rows, read once and kept on the
        device, decide its early stopping).
    chunk_size, block_size, prefetch : as for :func:`jaxsel.engine.fit_stream`.
    progress : a label for the progress line, per stage and epoch.
    checkpoint : path, optional: every stage writes its streamed loop's state every
        ``checkpoint_every`` epochs and when it ends, to its own file
        (:func:`jaxsel.engine.tagged_path`: ``fit.npz`` gives ``fit.pretrain.npz``,
        ``fit.frozen.npz``, ...). Run again with the same path, the finished stages'
        files give their results without a pass over the training rows (their
        validation rows are read again to check the file), the interrupted stage goes
        on from its file, and the result equals the uninterrupted streamed fit bit for
        bit. ``fingerprint`` (the caller's digest of its settings and data) ties the
        files to this fit, as for :func:`jaxsel.engine.fit_stream`.

    Returns
    -------
    ``(SparseBottleneckResult, info)`` with the engine's host-side ``info`` per stage.
    """
    if checkpoint is not None:
        checkpoint_every = engine.check_checkpoint_args(checkpoint, checkpoint_every)
    if cfg.pretrain_epochs and pre_rows is None:
        raise ValueError("cfg.pretrain_epochs > 0 needs pre_rows (the pre-training train / held-out rows)")
    if len(val_rows) > chunk_size:
        raise ValueError(f"val_rows has {len(val_rows)} rows, more than chunk_size={chunk_size}: R^2 is evaluated "
                         "in one piece; keep fewer.")
    n_pre = len(pre_rows[0]) if pre_rows is not None else len(train_rows)
    loops = _make_loops(cfg, len(train_rows), n_pre, progress)
    x_mean, y_mean = jnp.asarray(x_mean, jnp.float32), jnp.asarray(y_mean, jnp.float32)
    info = {}

    def run(name, m, k, start):
        tr, va = pre_rows if name == "pretrain" else (train_rows, val_rows)
        ck = None if checkpoint is None else engine.tagged_path(checkpoint, name)
        out = engine.fit_stream(m, getattr(loops, name), k, read, tr, va, chunk_size=chunk_size,
                                block_size=block_size, prefetch=prefetch, params=(start, {}), checkpoint=ck,
                                checkpoint_every=checkpoint_every, fingerprint=f"{fingerprint}/{name}")
        info[name] = out.info
        return out.result

    return _schedule(cfg, loops, key, x_mean, y_mean, _init_program(cfg, key), run), info


@jax.jit
def _init_program(cfg, key):
    return init_params(cfg, _stage_keys(key)[0])


class FitCheckpoint(NamedTuple):
    """Where a checkpointed fit (:func:`fit_checkpointed`) stands: ``stage`` indexes the
    schedule's stages (their count when finished), ``epoch`` counts epochs over the
    whole schedule (each stage from the sum of the earlier stages' lengths), ``params``
    the unpruned and ``pruned`` the pruned network, ``inner`` one engine
    :class:`~jaxsel.engine.Checkpoint` per stage (the current one live, later ones
    placeholders, earlier ones finished: their histories are the result's)."""

    stage: jax.Array
    epoch: jax.Array
    x_mean: jax.Array
    y_mean: jax.Array
    params: dict
    pruned: dict
    genes: jax.Array
    norms: jax.Array
    pre_best: jax.Array
    inner: tuple


def _stage_checkpoint(cfg, loops, name, key, data, split, pre_split, x_mean, y_mean, params, genes):
    k, sp = _stage_args(name, key, split, pre_split)
    m = _stage_method(cfg, name, x_mean, y_mean, genes)
    return engine.start(m, getattr(loops, name), k, data, sp, params=(_stage_start_params(cfg, name, params), {}))


def _ck_start(cfg, loops, key, data, split, pre_split) -> FitCheckpoint:
    x_mean, y_mean, params = _begin(cfg, key, data, split)
    genes, norms, pruned = _prune(cfg, params)  # placeholders until the pruning
    inner = []
    for i, name in enumerate(_present(loops)):
        p = pruned if name in _PRUNED else params
        ck = functools.partial(_stage_checkpoint, cfg, loops, name, key, data, split, pre_split, x_mean, y_mean, p,
                               genes)
        inner.append(ck() if i == 0 else jax.tree.map(jnp.zeros_like, jax.eval_shape(ck)))
    return FitCheckpoint(jnp.int32(0), jnp.int32(0), x_mean, y_mean, params, pruned, genes, norms,
                         jnp.int32(-1), tuple(inner))


def _ck_segment(cfg, loops, name, key, data, split, pre_split, ck: FitCheckpoint, stop_after):
    k, sp = _stage_args(name, key, split, pre_split)
    m = _stage_method(cfg, name, ck.x_mean, ck.y_mean, ck.genes)
    inner = ck.inner[_present(loops).index(name)]
    return engine.fit_one(m, getattr(loops, name), k, data, sp, resume=inner, stop_after=stop_after)


def _ck_advance(cfg, loops, name, key, data, split, pre_split, ck: FitCheckpoint, fr: engine.FitResult):
    """The checkpoint after stage ``name`` ended with ``fr``: its parameters kept, the
    network pruned before the first pruned stage (or at the end), the next stage
    started."""
    names = _present(loops)
    i = names.index(name)
    nxt = names[i + 1] if i + 1 < len(names) else None
    params, pruned, genes, norms = ck.params, ck.pruned, ck.genes, ck.norms
    if name in _PRUNED:
        pruned = fr.params
    else:
        params = fr.params
        if nxt is None or nxt in _PRUNED:
            genes, norms, pruned = _prune(cfg, params)
    inner = list(ck.inner)
    inner[i] = fr.checkpoint
    if nxt is not None:
        inner[i + 1] = _stage_checkpoint(cfg, loops, nxt, key, data, split, pre_split, ck.x_mean, ck.y_mean,
                                         pruned if nxt in _PRUNED else params, genes)
    pre_best = fr.best_epoch if name == "pretrain" else ck.pre_best
    epoch = sum(getattr(loops, n).max_epochs for n in names[: i + 1])
    return FitCheckpoint(jnp.int32(i + 1), jnp.int32(epoch), ck.x_mean, ck.y_mean, params, pruned, genes, norms,
                         pre_best, tuple(inner))


def _ck_result(ck: FitCheckpoint, names: tuple) -> SparseBottleneckResult:
    hists = {n: c.history for n, c in zip(names, ck.inner)}
    return _assemble(ck.genes, ck.norms, ck.pruned, ck.x_mean, ck.y_mean, hists, ck.pre_best)


def _run_stages(loops: _Loops, start, segment, advance, result, path, every: int, fingerprint: str):
    """The host loop of a checkpointed schedule (one fit, or a fold axis on every leaf):
    segments of the current stage up to ``stop_after`` over the whole schedule; a stage
    ends when every fold's engine checkpoint is done, then ``advance`` starts the next."""
    names = _present(loops)
    offsets = [sum(getattr(loops, n).max_epochs for n in names[:i]) for i in range(len(names) + 1)]

    def stage_of(ck) -> int:
        return int(np.max(np.asarray(ck.stage)))

    def seg(ck, stop_after):
        i = stage_of(ck)
        if i < len(names):
            name = names[i]
            loop = getattr(loops, name)
            fr = segment(name, ck, jnp.int32(min(int(stop_after) - offsets[i], loop.max_epochs)))
            if not bool(np.all(np.asarray(engine.checkpoint_done(loop, fr.checkpoint)))):
                inner = ck.inner[:i] + (fr.checkpoint,) + ck.inner[i + 1:]
                return None, ck._replace(inner=inner, epoch=(offsets[i] + fr.checkpoint.epoch).astype(jnp.int32))
            ck = advance(name, ck, fr)
        return (result(ck, names) if stage_of(ck) == len(names) else None), ck

    return engine.run_checkpointed(start, seg, path, every, fingerprint, max_epochs=offsets[-1],
                                   done=lambda ck: stage_of(ck) == len(names))


_ck_start_jit = jax.jit(_ck_start, static_argnames=("loops",))
_ck_segment_jit = jax.jit(_ck_segment, static_argnames=("loops", "name"))
_ck_advance_jit = jax.jit(_ck_advance, static_argnames=("loops", "name"))
_ck_result_jit = jax.jit(_ck_result, static_argnames=("names",))


def fit_checkpointed(cfg: SparseBottleneckConfig, key, data: dict, split: engine.Splits,
                     pre_split: engine.Splits | None = None, *, path, every: int, fingerprint: str,
                     progress: str | None = None) -> SparseBottleneckResult:
    """:func:`fit` in segments of at most ``every`` epochs (a segment ends with its
    stage), writing a :class:`FitCheckpoint` to ``path`` after each
    (:func:`jaxsel.engine.run_checkpointed`). Run again with the same path, settings and
    data (``fingerprint``), it goes on where it stopped; the result is the one of an
    uninterrupted :func:`fit`, bit for bit."""
    if cfg.pretrain_epochs and pre_split is None:
        raise ValueError("cfg.pretrain_epochs > 0 needs pre_split (the pre-training train / held-out cells)")
    pre_split = split if pre_split is None else pre_split
    loops = _make_loops(cfg, int(split.n_train), int(pre_split.n_train), progress)
    fold = (key, data, split, pre_split)
    return _run_stages(
        loops, lambda: _ck_start_jit(cfg, loops, *fold),
        lambda name, ck, stop: _ck_segment_jit(cfg, loops, name, *fold, ck, stop),
        lambda name, ck, fr: _ck_advance_jit(cfg, loops, name, *fold, ck, fr),
        _ck_result_jit, path, every, fingerprint)


def _per_fold(fn):
    """``fn(cfg, key, data, split, pre_split, *rest, *extra)`` as a
    :func:`jaxsel.engine.map_folds` body over ``(key, clusters, split, pre_split, *rest)``
    with ``(cfg, data, *extra)`` shared."""
    def one(per_fold, shared):
        key, c, split, pre_split, *rest = per_fold
        cfg, data, *extra = shared
        return fn(cfg, key, {**data, "c": c}, split, pre_split, *rest, *extra)

    return one


_FOLDS_STATIC = ("loops", "batch_size", "mesh")


@functools.partial(jax.jit, static_argnames=_FOLDS_STATIC)
def _ck_start_folds(cfg, loops, keys, data, clusters, splits, pre_splits, batch_size, mesh):
    fn = _per_fold(lambda cfg, *a: _ck_start(cfg, loops, *a))
    return engine.map_folds(fn, (keys, clusters, splits, pre_splits), (cfg, data), batch_size=batch_size, mesh=mesh)


@functools.partial(jax.jit, static_argnames=(*_FOLDS_STATIC, "name"))
def _ck_segment_folds(cfg, loops, name, keys, data, clusters, splits, pre_splits, ck, stop, batch_size, mesh):
    fn = _per_fold(lambda cfg, *a: _ck_segment(cfg, loops, name, *a))
    return engine.map_folds(fn, (keys, clusters, splits, pre_splits, ck), (cfg, data, stop), batch_size=batch_size,
                            mesh=mesh)


@functools.partial(jax.jit, static_argnames=(*_FOLDS_STATIC, "name"))
def _ck_advance_folds(cfg, loops, name, keys, data, clusters, splits, pre_splits, ck, fr, batch_size, mesh):
    fn = _per_fold(lambda cfg, *a: _ck_advance(cfg, loops, name, *a))
    return engine.map_folds(fn, (keys, clusters, splits, pre_splits, ck, fr), (cfg, data), batch_size=batch_size,
                            mesh=mesh)


@functools.partial(jax.jit, static_argnames=("names",))
def _ck_result_folds(ck, names):
    return jax.vmap(functools.partial(_ck_result, names=names))(ck)


@functools.partial(jax.jit, static_argnames=("loops", "batch_size", "mesh"))
def _fit_folds_program(cfg, loops, keys, data, clusters, splits, pre_splits, batch_size, mesh):
    fn = _per_fold(lambda cfg, *a: _fit_one(cfg, loops, *a))
    return engine.map_folds(fn, (keys, clusters, splits, pre_splits), (cfg, data), batch_size=batch_size, mesh=mesh)


def fit_folds(
    cfg: SparseBottleneckConfig,
    keys,
    data: dict,
    splits: engine.Splits,
    clusters=None,
    pre_splits: engine.Splits | None = None,
    *,
    batch_size: int | None = None,
    mesh="auto",
    lower: bool = False,
    progress: str | None = None,
) -> SparseBottleneckResult:
    """Every fold of the whole schedule in one compiled program.

    ``keys`` [n_folds] PRNG keys; ``splits`` with a leading fold axis; ``clusters``
    [n_folds, n_cells] per-fold pre-training labels and ``pre_splits`` the per-fold
    pre-training train / held-out cells (both required when pre-training).
    ``batch_size`` and ``mesh`` as in :func:`jaxsel.engine.fit_folds`; ``progress`` as in
    :func:`fit` (one line per fold, stage and epoch, at most once a second). Returns a
    :class:`SparseBottleneckResult` whose leaves have a leading [n_folds] axis.
    """
    loops, clusters, pre_splits, mesh = _prepare_folds(cfg, keys, data, splits, clusters, pre_splits, mesh, progress)
    args = (cfg, loops, keys, data, clusters, splits, pre_splits, batch_size, mesh)
    return _fit_folds_program.lower(*args) if lower else _fit_folds_program(*args)


def _prepare_folds(cfg, keys, data, splits, clusters, pre_splits, mesh, progress):
    """Checked ``(loops, clusters, pre_splits, mesh)`` of a fold-parallel fit."""
    n_folds = splits.n_folds
    if jax.random.key_data(keys).shape[0] != n_folds:
        raise ValueError(f"keys must have one key per fold ({n_folds}), got shape {keys.shape}")
    if cfg.pretrain_epochs and (pre_splits is None or clusters is None):
        raise ValueError("cfg.pretrain_epochs > 0 needs clusters and pre_splits per fold")
    if pre_splits is None:
        pre_splits = splits
    if clusters is None:
        clusters = jnp.zeros((n_folds, data["x"].shape[0]), jnp.int32)
    clusters = jnp.maximum(jnp.asarray(clusters, jnp.int32), 0)  # -1: outside the fold, never read
    if mesh == "auto":
        mesh = engine.fold_mesh()
    loops = _make_loops(cfg, int(jnp.min(splits.n_train)), int(jnp.min(pre_splits.n_train)), progress)
    return loops, clusters, pre_splits, mesh


def fit_folds_checkpointed(cfg: SparseBottleneckConfig, keys, data: dict, splits: engine.Splits, clusters=None,
                           pre_splits: engine.Splits | None = None, *, path, every: int, fingerprint: str,
                           batch_size: int | None = None, mesh="auto",
                           progress: str | None = None) -> SparseBottleneckResult:
    """:func:`fit_folds` in checkpointed segments (as :func:`fit_checkpointed`, every fold
    at once: a stage ends when every fold has ended it). A resumed run equals an
    uninterrupted one bit for bit. Against :func:`fit_folds` with the same
    ``batch_size`` and ``mesh``: the same genes and training histories bit for bit
    (tested); the per-epoch metrics of the evaluation cells may differ in the last bit
    (XLA:CPU rounds that evaluation differently in the stage programs than in the
    whole one; measured up to 2.4e-7)."""
    loops, clusters, pre_splits, mesh = _prepare_folds(cfg, keys, data, splits, clusters, pre_splits, mesh, progress)
    folds = (keys, data, clusters, splits, pre_splits)
    kw = dict(batch_size=batch_size, mesh=mesh)
    return _run_stages(
        loops, lambda: _ck_start_folds(cfg, loops, *folds, **kw),
        lambda name, ck, stop: _ck_segment_folds(cfg, loops, name, *folds, ck, stop, **kw),
        lambda name, ck, fr: _ck_advance_folds(cfg, loops, name, *folds, ck, fr, **kw),
        _ck_result_folds, path, every, fingerprint)


# ------------------------------------------------------------------------- inference


@functools.partial(jax.jit, static_argnames=("cfg_net", "head"))
def _apply(cfg_net, head, params, genes, x_mean, x):
    xs = jnp.take(x, genes, axis=1) - jnp.take(x_mean, genes)
    return cfg_net.apply({"params": params}, xs, head)


def _infer(cfg, result, x, head: str, chunk: int):
    fn = lambda xc: _apply(cfg.net, head, result.params, result.genes, result.x_mean, xc)  # noqa: E731
    return engine.chunked(fn, jnp.asarray(x, jnp.float32), chunk)


def predict(cfg: SparseBottleneckConfig, result: SparseBottleneckResult, x, chunk: int = 4096):
    """Predicted ``Y`` (in the original, uncentred units of the training ``Y``), [n, q].
    Chunked over cells: any input length reuses one compiled program."""
    return _infer(cfg, result, x, "regr", chunk) + result.y_mean


def latent(cfg: SparseBottleneckConfig, result: SparseBottleneckResult, x, chunk: int = 4096):
    """The 2-D (``latent_size``) bottleneck embedding, [n, latent_size]."""
    return _infer(cfg, result, x, "latent", chunk)


def reconstruct_genes(cfg: SparseBottleneckConfig, result: SparseBottleneckResult, x, chunk: int = 4096):
    """The autoencoder head's prediction of the selected genes, [n, n_selected]
    (uncentred; meaningful only when the schedule ran ``ae_epochs``)."""
    return _infer(cfg, result, x, "ae", chunk) + jnp.take(result.x_mean, result.genes)

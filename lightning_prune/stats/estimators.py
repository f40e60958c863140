"""Curvature estimators fed from the training-time capture (:mod:`lightning_prune.stats.capture`).

Every estimator approximates the Hessian of the training loss as it is computed (a mean over its
terms, such as a language model's tokens, or a sum; :func:`~lightning_prune.stats.capture.per_sample_factor`
scales the gradients it is fed) and stores its statistics as **sums plus counts**, so a single
all-reduce of :meth:`Estimator.tensors` gives the estimate of the union of all ranks' batches, what
one process would compute. Sums are float32, accumulated
in place (``addmm_``, TF32 off) over at most ``num_batches`` batches whatever the training
precision; counts are float64; estimates are returned in float64.

Per-layer inputs are rows ``x: (N, T, d_in)`` and per-sample output gradients
``g: (N, T, d_out)``; the per-sample weight gradient is ``G_n = sum_t g[n,t] x[n,t]^T``.

=================  ===============================================================
``inputs``          ``A = E_{n,t}[x x^T]`` only: layer-wise OBS's label-free Hessian
``cross``           ``A`` and ``C = E[x_ref x^T]`` with the inputs at reference weights
``fisher``          diag empirical Fisher ``E_n[G_n ** 2]`` (per-sample, never the
                    square of the batch gradient)
``kfac``            ``A = E_{n,t}[x x^T]``, ``G = E_n[sum_t g g^T]``; diag = diag(G) diag(A)^T
``ekfac``           eigenbases of A, G from the first half of the window, then
                    ``S = E_n[(Q_G^T G_n Q_A) ** 2]`` from the second half;
                    diag = ``(Q_G**2) S (Q_A**2)^T`` (George et al. 2018)
=================  ===============================================================
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_prune.engine.targets import PruneTarget
from lightning_prune.runtime.distributed import LOCAL, Collectives

_CHUNK_ELEMENTS = 1 << 24  # per-sample gradients are materialised in chunks of at most this size


def per_sample_grads(x: Tensor, g: Tensor) -> Tensor:
    """``(N, d_out, d_in)`` per-sample weight gradients ``sum_t g[n,t] x[n,t]^T``."""
    return torch.einsum("nto,nti->noi", g, x)


def _chunks(x: Tensor, g: Tensor):
    per_sample = g.shape[-1] * x.shape[-1]
    step = max(1, _CHUNK_ELEMENTS // max(per_sample, 1))
    for i in range(0, x.shape[0], step):
        yield x[i : i + step], g[i : i + step]


def add_sum_sq_per_sample_grads_(out: Tensor, x: Tensor, g: Tensor) -> None:
    """``out += sum_n G_n ** 2`` without materialising all per-sample gradients at once."""
    if x.shape[1] == 1:  # one row per sample: G_n is rank one, G_n**2 = (g**2)(x**2)^T
        out.addmm_((g[:, 0] ** 2).T, x[:, 0] ** 2)
        return
    for xc, gc in _chunks(x, g):
        out += (per_sample_grads(xc, gc) ** 2).sum(0)


def _is_parts(value: Any) -> bool:
    """A dict of nested estimators (``Composite.parts``)."""
    return isinstance(value, dict) and bool(value) and all(isinstance(v, Estimator) for v in value.values())


def _tensors(value: Any) -> list[Tensor]:
    if isinstance(value, Tensor):
        return [value]
    if isinstance(value, dict) and not _is_parts(value):
        return list(value.values())
    return []


def _tag(value: Any) -> str:
    if isinstance(value, Tensor):
        return "tensor"
    if isinstance(value, Estimator):
        return "estimator"
    return "estimators" if _is_parts(value) else "layers"


def _field(field: Any, key: str, refuse: Any) -> tuple[str, Any]:
    if not isinstance(field, (tuple, list)) or len(field) != 2:
        raise refuse(f"{key!r} is {type(field).__name__}, not a (kind, value) pair: corrupted or hand-edited")
    return field[0], field[1]


def _check_tensor(saved: Any, into: Tensor, key: str, refuse: Any) -> None:
    if not isinstance(saved, Tensor) or saved.shape != into.shape or saved.dtype != into.dtype:
        what = f"{saved.dtype} {tuple(saved.shape)}" if isinstance(saved, Tensor) else type(saved).__name__
        raise refuse(f"{key} is {what}, this estimator has {into.dtype} {tuple(into.shape)}")


def _copy(into: Tensor, src: Tensor) -> None:
    with torch.no_grad():
        into.copy_(src)


COUNTS = ("batches", "skipped", "reduced", "samples_seen", "terms_seen")  # progress, not layout: not settings


class Estimator:
    """Base: per-layer float32 sums + float64 counts; subclasses define what is summed.

    ``needs_grad`` says whether :meth:`update` uses the output gradients ``g`` (and therefore a
    loss); ``comm`` all-reduces the sums across ranks.
    """

    name = "base"
    needs_grad = True
    fisher_type = "empirical"  # which Fisher the gradients came from (set by the pass that fills it)

    def __init__(self, targets: Sequence[PruneTarget], comm: Collectives = LOCAL) -> None:
        self.targets = {t.name: t for t in targets}
        self.comm = comm
        self.batches = 0  # window batches folded in (this rank)
        self.skipped = 0  # batches dropped because their inputs or gradients were not finite (this rank)
        self.reduced = False  # all-reduced: every rank holds the totals (a round interrupted after its window)
        self.samples_seen = 0.0  # samples and loss terms of the gradient batches (this rank), for the record
        self.terms_seen = 0.0

    def update(self, name: str, x: Tensor, g: Tensor | None) -> None:
        raise NotImplementedError

    def end_batch(self) -> None:
        self.batches += 1

    def tensors(self) -> list[Tensor]:
        """Every sum and count, for the cross-rank all-reduce."""
        raise NotImplementedError

    def note_terms(self, samples: int, terms: float | None) -> None:
        """Record a gradient batch's samples and the loss terms its loss call averaged over (``None``: one
        per sample, the loss made no call that says; see :func:`~lightning_prune.stats.capture.per_sample_factor`)."""
        self.samples_seen += samples
        self.terms_seen += samples if terms is None else terms

    @property
    def terms_per_sample(self) -> float:
        """Loss terms per sample of the gradients folded in (tokens per sequence for a language model; NaN: none)."""
        return self.terms_seen / self.samples_seen if self.samples_seen else math.nan

    def reduce_(self) -> None:
        self.comm.all_reduce_sum_(self.tensors())
        self.reduced = True

    def nonfinite_layers(self) -> list[str]:
        """Layers with a NaN/inf in any of their statistics.

        Found generically: every attribute that maps the target names to tensors is a per-layer
        statistic, so a new estimator is covered without code of its own.
        """
        bad: set[str] = set()
        for value in vars(self).values():
            if isinstance(value, Estimator):
                bad.update(value.nonfinite_layers())
            elif isinstance(value, dict) and value and set(value) <= set(self.targets):
                bad.update(n for n, t in value.items() if isinstance(t, Tensor) and not bool(torch.isfinite(t).all()))
            elif isinstance(value, dict) and all(isinstance(v, Estimator) for v in value.values()):
                for part in value.values():
                    bad.update(part.nonfinite_layers())
        return [n for n in self.targets if n in bad]

    def diagonal(self, name: str) -> Tensor:
        """Weight-shaped estimate of diag(H) for layer ``name`` (float64)."""
        raise NotImplementedError

    def seen(self, name: str) -> bool:
        raise NotImplementedError

    # ------------------------------------------------------------------ checkpointing an open window
    def pending(self) -> list[Tensor]:
        """The sums this rank has not all-reduced with the other ranks yet (by default: all of :meth:`tensors`)."""
        return self.tensors()

    def state_dict(self, *, summed: bool = False) -> dict[str, Any]:
        """The statistics so far as CPU copies, to continue a capture window after a resume.

        Found generically (as in :meth:`nonfinite_layers`): every tensor attribute, every per-layer
        ``{target name: tensor}`` dict and every nested estimator, with the scalar settings that fix
        their layout and the batch counts, so a new estimator checkpoints without code of its own.
        ``summed=True`` sums the :meth:`pending` sums and ``skipped`` over the ranks (a collective: every
        rank must call it), so one rank's state carries the statistics of all ranks' batches.
        """
        summed = summed and not self.reduced  # reduced sums are totals already, on every rank
        fields = self._statistics()
        own = {id(t) for v in fields.values() for t in _tensors(v)}
        pending = [t for t in self.pending() if id(t) in own]  # nested estimators sum their own
        device = next(iter(self.targets.values())).param.device  # where the backend reduces (NCCL: the GPU)
        skipped = torch.tensor([float(self.skipped)], dtype=torch.float64, device=device)
        reduced: dict[int, Tensor] = {}
        if summed and self.comm.world_size > 1:
            copies = [t.clone() for t in pending]
            self.comm.all_reduce_sum_([*copies, skipped])
            reduced = {id(t): c for t, c in zip(pending, copies)}

        def cpu(t: Tensor) -> Tensor:
            return reduced.get(id(t), t).detach().to("cpu", copy=True)

        out: dict[str, Any] = {}
        for key, value in fields.items():
            if isinstance(value, Tensor):
                out[key] = (_tag(value), cpu(value))
            elif isinstance(value, Estimator):
                out[key] = (_tag(value), value.state_dict(summed=summed))
            elif _is_parts(value):
                out[key] = (_tag(value), {k: v.state_dict(summed=summed) for k, v in value.items()})
            else:
                out[key] = (_tag(value), {n: cpu(t) for n, t in value.items()})
        return {
            "kind": self.name,
            "settings": self._settings(),
            "batches": self.batches,
            "skipped": int(skipped.item()),
            "terms": [self.samples_seen, self.terms_seen],  # this rank's, for the record only
            "fields": out,
        }

    def load_state_dict(self, state: Mapping[str, Any], *, sums: bool = True) -> None:
        """Continue from :meth:`state_dict`, into a fresh estimator made for the same window.

        ``sums=False`` loads everything but leaves the :meth:`pending` sums and ``skipped`` at zero:
        what a rank other than 0 does under DDP, whose share the checkpoint (rank 0's state, summed over
        ranks) already holds, so the round's all-reduce gives the same totals. Another estimator's
        state, or one of another layout (targets, shapes, settings), raises ``ValueError`` naming the
        difference before anything is changed.
        """
        for apply in self._load_plan(state, "the checkpointed statistics"):
            apply()
        if not sums:
            with torch.no_grad():
                for t in self.pending():
                    t.zero_()
            self._zero_skipped()

    def _statistics(self) -> dict[str, Any]:
        """The attributes that hold statistics: tensors, per-layer tensor dicts, nested estimators."""
        names = set(self.targets)
        out: dict[str, Any] = {}
        for key, value in vars(self).items():
            if key in ("targets", "comm"):
                continue
            if isinstance(value, (Tensor, Estimator)) or (
                isinstance(value, dict)
                and (_is_parts(value) or (set(value) <= names and all(isinstance(v, Tensor) for v in value.values())))
            ):
                out[key] = value
        return out

    def _settings(self) -> dict[str, Any]:
        """Scalar attributes (``diagonal_only``, ``block_size``, ``phase_one``, ...): they fix the layout."""
        return {k: v for k, v in vars(self).items() if isinstance(v, (bool, int, float, str)) and k not in COUNTS}

    def _zero_skipped(self) -> None:
        self.skipped = 0
        for value in self._statistics().values():
            for part in [value] if isinstance(value, Estimator) else value.values() if _is_parts(value) else []:
                part._zero_skipped()

    def _load_plan(self, state: Mapping[str, Any], where: str) -> list[Any]:
        """Check ``state`` against this estimator; the assignments that load it (nothing changed yet)."""

        def refuse(why: str) -> ValueError:
            return ValueError(f"{where} do not fit this window's {self.name!r} estimator: {why}")

        try:
            kind, settings, fields = state["kind"], dict(state["settings"]), dict(state["fields"])
            batches, skipped = int(state["batches"]), int(state["skipped"])
            samples, terms = (float(x) for x in state.get("terms", (0.0, 0.0)))
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{where} are corrupted or hand-edited ({type(err).__name__}: {err})") from err
        if kind != self.name:
            raise refuse(f"they are {kind!r} statistics")
        if settings != self._settings():
            raise refuse(f"settings {settings}, this estimator has {self._settings()}")
        mine = self._statistics()
        if set(fields) != set(mine):
            raise refuse(f"fields {sorted(fields)}, this estimator has {sorted(mine)}")
        plan: list[Any] = []
        for key, value in mine.items():
            tag, saved = _field(fields[key], key, refuse)
            if tag != _tag(value):
                raise refuse(f"{key!r} holds {tag!r}, this estimator {_tag(value)!r}")
            if isinstance(value, Tensor):
                _check_tensor(saved, value, repr(key), refuse)
                plan.append(lambda into=value, src=saved: _copy(into, src))
            elif isinstance(value, Estimator):
                plan += value._load_plan(saved, f"{where}[{key!r}]")
            elif _is_parts(value):
                if not isinstance(saved, Mapping) or set(saved) != set(value):
                    raise refuse(f"{key!r} holds parts {sorted(saved)}, this estimator has {sorted(value)}")
                for k, part in value.items():
                    plan += part._load_plan(saved[k], f"{where}[{k!r}]")
            else:
                if not isinstance(saved, Mapping):
                    raise refuse(f"{key!r} is not a per-layer dict")
                if unknown := sorted(set(saved) - set(self.targets)):
                    raise refuse(f"{key!r} holds layers {unknown[:5]} that are not this run's targets")
                if value and set(saved) != set(value):  # filled from the start: the same layers
                    raise refuse(f"{key!r} holds layers {sorted(saved)[:5]}, this estimator {sorted(value)[:5]}")
                for n, src in saved.items():
                    if n in value:
                        _check_tensor(src, value[n], f"{key}[{n!r}]", refuse)
                        plan.append(lambda into=value[n], src=src: _copy(into, src))
                    elif isinstance(src, Tensor):  # filled during the window (EKFAC's eigenbases), as saved
                        # a copy: the estimator adds into it, and must not into the checkpoint's tensor
                        own = src.to(self.targets[n].param.device, copy=True)
                        plan.append(lambda d=value, n=n, own=own: d.__setitem__(n, own))
                    else:
                        raise refuse(f"{key}[{n!r}] is {type(src).__name__}, not a tensor")

        def counts() -> None:
            self.batches, self.skipped = batches, skipped
            self.samples_seen, self.terms_seen = samples, terms

        return [*plan, counts]

    def _shape(self, name: str, flat: Tensor) -> Tensor:
        """An ``(d_out, d_in)`` statistic (or its flattening) in the weight's own layout."""
        return self.targets[name].unmatrix(flat)


class InputCovariance(Estimator):
    """``A = E[x x^T]`` of each layer's inputs (rows): the Hessian of layer-wise OBS's reconstruction
    loss (OBC/SparseGPT's ``2 X X^T`` up to scale). Needs no labels, no loss, no backward pass.

    ``diagonal_only=True`` keeps just ``E[x_j^2]``: the layer-wise Hessian's diagonal, whose OBD
    saliency ``1/2 w_ij^2 E[x_j^2]`` ranks each row's weights as Wanda's ``|w_ij| ||x_j||`` does.
    """

    name = "inputs"
    needs_grad = False

    def __init__(self, targets: Sequence[PruneTarget], comm: Collectives = LOCAL, diagonal_only: bool = False) -> None:
        super().__init__(targets, comm)
        self.diagonal_only = diagonal_only
        self.A: dict[str, Tensor] = {}
        self.count: dict[str, Tensor] = {}
        for n, t in self.targets.items():
            d_in = t.shape2d[1]
            shape = (d_in,) if diagonal_only else (d_in, d_in)
            self.A[n] = torch.zeros(shape, dtype=torch.float32, device=t.param.device)
            self.count[n] = torch.zeros((), dtype=torch.float64, device=t.param.device)

    def update(self, name: str, x: Tensor, g: Tensor | None = None) -> None:
        xf = x.reshape(-1, x.shape[-1]).float()
        if self.diagonal_only:
            self.A[name] += (xf**2).sum(0)
        else:
            self.A[name].addmm_(xf.T, xf)
        self.count[name] += xf.shape[0]

    def diagonal(self, name: str) -> Tensor:
        """Weight-shaped ``E[x_j^2]`` (every output row sees the same inputs), float64."""
        a = self.A[name].double() / self.count[name]
        diag = a if self.diagonal_only else torch.diagonal(a)
        rows = self.targets[name].shape2d[0]
        return self._shape(name, diag.expand(rows, -1).contiguous())

    def tensors(self) -> list[Tensor]:
        return [*self.A.values(), *self.count.values()]

    def seen(self, name: str) -> bool:
        return bool(self.count[name] > 0)

    def input_covariance(self, name: str, dtype: torch.dtype = torch.float64, release: bool = False) -> Tensor:
        """Normalised ``A`` in ``dtype``: one copy (a float32 solve never holds a float64 one). ``release``: the
        layer's last use: the sum leaves the estimator and becomes the estimate (no copy in float32)."""
        if self.diagonal_only:
            raise RuntimeError("this input estimator kept only the diagonal")
        count = self.count[name]
        return self.A.pop(name).to(dtype).div_(count) if release else self.A[name].to(dtype, copy=True).div_(count)


class CrossCovariance(InputCovariance):
    """``A = E[x x^T]`` of each layer's current inputs and ``C = E[x_ref x^T]``, their cross moment
    with the inputs the same samples produce at reference weights (the weights a round started from).

    Layer-wise OBS then fits the reference outputs rather than the layer's own:
    ``min_w E||W x_ref - w x||^2`` has the unconstrained solution ``W C A^-1``, so the error that
    pruning earlier layers put into ``x`` is corrected instead of reproduced (asymmetric
    calibration, as in GPTAQ). Filled by :func:`~lightning_prune.stats.passes.reference_pass`.
    """

    name = "cross"

    def __init__(self, targets: Sequence[PruneTarget], comm: Collectives = LOCAL) -> None:
        super().__init__(targets, comm)
        self.C = {n: torch.zeros_like(a) for n, a in self.A.items()}

    def update_pair(self, name: str, x_ref: Tensor, x: Tensor) -> None:
        xf, rf = x.reshape(-1, x.shape[-1]).float(), x_ref.reshape(-1, x_ref.shape[-1]).float()
        self.A[name].addmm_(xf.T, xf)
        self.C[name].addmm_(rf.T, xf)
        self.count[name] += xf.shape[0]

    def update(self, name: str, x: Tensor, g: Tensor | None = None) -> None:
        raise TypeError("CrossCovariance needs pairs of inputs: update_pair(name, x_ref, x)")

    def tensors(self) -> list[Tensor]:
        return [*self.A.values(), *self.C.values(), *self.count.values()]

    def cross_covariance(self, name: str, dtype: torch.dtype = torch.float64, release: bool = False) -> Tensor:
        """Normalised ``C = E[x_ref x^T]`` in ``dtype`` (``release``: as :meth:`input_covariance`'s)."""
        count = self.count[name]
        return self.C.pop(name).to(dtype).div_(count) if release else self.C[name].to(dtype, copy=True).div_(count)


class DiagFisher(Estimator):
    """Diagonal empirical Fisher from per-sample gradients."""

    name = "fisher"

    def __init__(self, targets: Sequence[PruneTarget], comm: Collectives = LOCAL) -> None:
        super().__init__(targets, comm)
        self.sq: dict[str, Tensor] = {}
        self.count: dict[str, Tensor] = {}
        for n, t in self.targets.items():
            self.sq[n] = torch.zeros(t.shape2d, dtype=torch.float32, device=t.param.device)
            self.count[n] = torch.zeros((), dtype=torch.float64, device=t.param.device)

    def update(self, name: str, x: Tensor, g: Tensor) -> None:
        add_sum_sq_per_sample_grads_(self.sq[name], x.float(), g.float())
        self.count[name] += x.shape[0]

    def tensors(self) -> list[Tensor]:
        return [*self.sq.values(), *self.count.values()]

    def seen(self, name: str) -> bool:
        return bool(self.count[name] > 0)

    def diagonal(self, name: str) -> Tensor:
        return self._shape(name, self.sq[name].double() / self.count[name])


class KFAC(Estimator):
    """Kronecker factors ``A = E[x x^T]`` (over rows) and ``G = E_n[sum_t g g^T]`` (over samples).

    ``diagonal_only=True`` keeps just ``diag(A)`` and ``diag(G)``, all that OBD's ``diag(A) (x) diag(G)``
    needs: O(d) per sample instead of the O(d^2) factors (which OBS and EKFAC need).
    """

    name = "kfac"

    def __init__(self, targets: Sequence[PruneTarget], diagonal_only: bool = False, comm: Collectives = LOCAL) -> None:
        super().__init__(targets, comm)
        self.diagonal_only = diagonal_only
        self.A: dict[str, Tensor] = {}
        self.G: dict[str, Tensor] = {}
        self.a_count: dict[str, Tensor] = {}
        self.g_count: dict[str, Tensor] = {}
        for n, t in self.targets.items():
            (d_out, d_in), w = t.shape2d, t.param
            kw = dict(dtype=torch.float32, device=w.device)
            if diagonal_only:
                self.A[n], self.G[n] = torch.zeros(d_in, **kw), torch.zeros(d_out, **kw)
            else:
                self.A[n], self.G[n] = torch.zeros(d_in, d_in, **kw), torch.zeros(d_out, d_out, **kw)
            kw["dtype"] = torch.float64
            self.a_count[n], self.g_count[n] = torch.zeros((), **kw), torch.zeros((), **kw)

    def update(self, name: str, x: Tensor, g: Tensor) -> None:
        xf, gf = x.reshape(-1, x.shape[-1]).float(), g.reshape(-1, g.shape[-1]).float()
        if self.diagonal_only:
            self.A[name] += (xf**2).sum(0)
            self.G[name] += (gf**2).sum(0)
        else:
            self.A[name].addmm_(xf.T, xf)
            self.G[name].addmm_(gf.T, gf)
        self.a_count[name] += xf.shape[0]
        self.g_count[name] += x.shape[0]

    def tensors(self) -> list[Tensor]:
        return [*self.A.values(), *self.G.values(), *self.a_count.values(), *self.g_count.values()]

    def seen(self, name: str) -> bool:
        return bool(self.a_count[name] > 0)

    def factors(self, name: str) -> tuple[Tensor, Tensor]:
        """Normalised ``(A, G)`` in float64."""
        if self.diagonal_only:
            raise RuntimeError("this K-FAC estimator kept only the diagonals of its factors")
        return self.A[name].double() / self.a_count[name], self.G[name].double() / self.g_count[name]

    def input_covariance(self, name: str, dtype: torch.dtype = torch.float64, release: bool = False) -> Tensor:
        """Normalised ``A`` in ``dtype`` (as :class:`InputCovariance` gives it; a new tensor, whatever ``release``)."""
        return self.factors(name)[0].to(dtype)

    def diagonal(self, name: str) -> Tensor:
        if self.diagonal_only:
            a, g = self.A[name].double() / self.a_count[name], self.G[name].double() / self.g_count[name]
        else:
            A, G = self.factors(name)
            a, g = torch.diagonal(A), torch.diagonal(G)
        return self._shape(name, torch.outer(g, a))


class EKFAC(KFAC):
    """Eigenvalue-corrected K-FAC: K-FAC eigenbases, per-sample second moments re-estimated in them.

    The window is split in two phases: the first ``ceil(num_batches / 2)`` batches estimate A and
    G; their eigenbases (all-reduced first, so every rank uses the same basis) fix the basis in
    which the remaining batches accumulate ``S``.
    """

    name = "ekfac"

    def __init__(self, targets: Sequence[PruneTarget], num_batches: int, comm: Collectives = LOCAL) -> None:
        super().__init__(targets, comm=comm)
        if num_batches < 2:
            raise ValueError(f"curvature='ekfac' needs `num_batches` >= 2 (two phases), got {num_batches}")
        self.phase_one = math.ceil(num_batches / 2)
        self.QA: dict[str, Tensor] = {}
        self.QG: dict[str, Tensor] = {}
        self.S: dict[str, Tensor] = {}
        self.s_count: dict[str, Tensor] = {}

    @property
    def in_phase_two(self) -> bool:
        return bool(self.QA)

    def update(self, name: str, x: Tensor, g: Tensor) -> None:
        if not self.in_phase_two:
            return super().update(name, x, g)
        if name not in self.QA:  # the layer saw no data in phase one
            return
        qa, qg = self.QA[name].float(), self.QG[name].float()
        add_sum_sq_per_sample_grads_(self.S[name], x.float() @ qa, g.float() @ qg)
        self.s_count[name] += x.shape[0]

    def end_batch(self) -> None:
        super().end_batch()
        if self.batches == self.phase_one and not self.in_phase_two:
            self.comm.all_reduce_sum_(super().tensors())
            for n in self.targets:
                if not super().seen(n):
                    continue
                A, G = self.factors(n)
                self.QA[n] = torch.linalg.eigh(A).eigenvectors
                self.QG[n] = torch.linalg.eigh(G).eigenvectors
                self.S[n] = torch.zeros(G.shape[0], A.shape[0], dtype=torch.float32, device=A.device)
                self.s_count[n] = torch.zeros((), dtype=torch.float64, device=A.device)

    def tensors(self) -> list[Tensor]:
        # A and G were reduced at the phase switch; only the phase-two sums remain
        return [*self.S.values(), *self.s_count.values()]

    def pending(self) -> list[Tensor]:
        """Phase one: this rank's A and G (reduced at the switch); phase two: ``S`` and its counts."""
        return self.tensors() if self.in_phase_two else super().tensors()

    def seen(self, name: str) -> bool:
        return name in self.s_count and bool(self.s_count[name] > 0)

    def diagonal(self, name: str) -> Tensor:
        S = self.S[name].double() / self.s_count[name]
        return self._shape(name, (self.QG[name] ** 2) @ S @ (self.QA[name] ** 2).T)


class Composite(Estimator):
    """Several estimators fed from one capture (e.g. K-FAC factors plus the Fisher diagonal)."""

    name = "composite"

    def __init__(self, parts: dict[str, Estimator]) -> None:
        first = next(iter(parts.values()))
        super().__init__(list(first.targets.values()), first.comm)
        self.parts = parts
        self.needs_grad = any(p.needs_grad for p in parts.values())

    def __getitem__(self, key: str) -> Estimator:
        return self.parts[key]

    def update(self, name: str, x: Tensor, g: Tensor | None) -> None:
        for p in self.parts.values():
            p.update(name, x, g)

    def update_pair(self, name: str, x_ref: Tensor, x: Tensor) -> None:
        for p in self.parts.values():
            p.update_pair(name, x_ref, x)

    def end_batch(self) -> None:
        super().end_batch()
        for p in self.parts.values():
            p.end_batch()

    def tensors(self) -> list[Tensor]:
        return [t for p in self.parts.values() for t in p.tensors()]

    def pending(self) -> list[Tensor]:
        return [t for p in self.parts.values() for t in p.pending()]

    def seen(self, name: str) -> bool:
        return all(p.seen(name) for p in self.parts.values())

"""Training styles of transformers users: bf16 precision, activation checkpointing, torch.compile.

Each is checked against a reference (same weights, same batches): masks stay frozen, rounds reach
their target, and the statistics a round uses are those of plain float32 eager training (bf16: the
float32 sums of the rows the hooks saw, recomputed in float64). Compiled runs
use the ``aot_eager`` backend (AOTAutograd's forward and backward graphs, no code generation), which
exercises the same dynamo guards, graphs and hooks as inductor at a fraction of the compile time.
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from conftest import TinyNet, make_trainer
from test_engine import FrozenChecker
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_prune import MagnitudePruning, OBDPruning, OBSPruning
from lightning_prune.callbacks.base import PruningCallback
from lightning_prune.engine.targets import resolve_targets
from lightning_prune.stats import Estimator
from lightning_prune.stats.capture import EAGER_WHILE_CAPTURING, LayerCapture


@pytest.fixture(autouse=True)
def _no_capture_left_attached():
    """Every test leaves the compiler's stance as it found it (no capture still holds force_eager)."""
    yield
    gc.collect()  # captures whose models are gone release their hold
    assert not EAGER_WHILE_CAPTURING.holders
    torch._dynamo.reset()


def spy_on_stats(pruner: PruningCallback) -> PruningCallback:
    """Keep the statistics each round's criterion receives (``pruner.stats``), and the targets' dtypes."""
    prune = pruner.criterion.prune
    pruner.stats, pruner.dtypes = [], []  # type: ignore[attr-defined]

    def spy(ctx):
        pruner.stats.append(ctx.stats)  # type: ignore[attr-defined]
        pruner.dtypes.append({t.name: t.param.dtype for t in ctx.targets})  # type: ignore[attr-defined]
        return prune(ctx)

    pruner.criterion.prune = spy  # type: ignore[method-assign]
    return pruner


def record_rows(pruner: PruningCallback) -> PruningCallback:
    """Every estimator the criterion makes keeps the rows it folds in (``est.rows``: layer, x, g)."""
    make = pruner.criterion.make_estimator

    def making(*args: Any, **kwargs: Any) -> Estimator | None:
        est = make(*args, **kwargs)
        if est is not None:
            update, est.rows = est.update, []  # type: ignore[attr-defined]

            def recording(name: str, x: Tensor, g: Tensor | None = None) -> None:
                est.rows.append((name, x.clone(), None if g is None else g.clone()))  # type: ignore[attr-defined]
                update(name, x, g)

            est.update = recording  # type: ignore[method-assign]
        return est

    pruner.criterion.make_estimator = making  # type: ignore[method-assign]
    return pruner


def sums(stats: Estimator) -> dict[str, Tensor]:
    """The float32 sums (and float64 counts) of OBD's DiagFisher or layer-wise OBS's K-FAC + Fisher, by
    layer name (``torch.compile(submodule)``'s ``_orig_mod`` left out of it)."""
    parts = stats.parts if hasattr(stats, "parts") else {"fisher": stats}  # type: ignore[attr-defined]
    out = {}
    for part, est in parts.items():
        for attr in ("sq", "count", "A", "G", "a_count", "g_count"):
            for name, t in getattr(est, attr, {}).items():
                out[f"{part}.{attr}[{name.replace('._orig_mod', '')}]"] = t
    return out


def float64_sums(rows: list[tuple[str, Tensor, Tensor]]) -> dict[str, Tensor]:
    """What the sums should be, from the very rows the hooks captured, accumulated in float64."""
    out: dict[str, Tensor] = {}

    def add(key: str, value: Tensor) -> None:
        out[key] = out[key] + value if key in out else value

    for name, x, g in rows:
        x, g = x.double(), g.double()
        add(f"fisher.sq[{name}]", (torch.einsum("nto,nti->noi", g, x) ** 2).sum(0))
        xr, gr = x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1])
        add(f"kfac.A[{name}]", xr.T @ xr)
        add(f"kfac.G[{name}]", gr.T @ gr)
    return out


def assert_close_to_scale(got: Tensor, ref: Tensor, rtol: float, key: str) -> None:
    """``got`` within ``rtol`` of ``ref``'s largest entry, everywhere."""
    err = float((got.double() - ref.double()).abs().max())
    assert err <= rtol * float(ref.abs().max()), f"{key}: max error {err}, scale {float(ref.abs().max())}"


def assert_stats_close(got: Estimator, ref: Estimator, rtol: float) -> None:
    """Every sum within ``rtol`` of its reference's largest entry; every count equal."""
    a, b = sums(got), sums(ref)
    assert a.keys() == b.keys() and a
    for key in b:
        if "count" in key:
            assert torch.equal(a[key], b[key]), f"{key}: {a[key]} samples, reference {b[key]}"
        else:
            assert_close_to_scale(a[key], b[key], rtol, key)


# ================================================================ a. bf16 precision
@pytest.fixture(scope="module")
def trained() -> dict[str, Tensor]:
    """TinyNet trained in float32, its weights rounded to bf16: a bf16-true run starts from the
    float32 run's weights, and pruning it costs loss (so OBS's compensation shows)."""
    pl.seed_everything(0, verbose=False)
    model = TinyNet(optimizer="adam", lr=1e-2)
    make_trainer(max_epochs=3, limit_val_batches=0).fit(model)
    return {k: v.bfloat16().float() for k, v in model.state_dict().items()}


def bf16_net(state: dict[str, Tensor], lr: float) -> TinyNet:
    pl.seed_everything(0, verbose=False)
    model = TinyNet(optimizer="adamw", lr=lr, weight_decay=0.01)
    model.load_state_dict(state)
    return model


def one_round(cls: type[PruningCallback], precision: str, state: dict[str, Tensor]) -> tuple[PruningCallback, TinyNet]:
    """A one-shot round after one epoch at lr=0: the statistics see the same weights and batches."""
    pruner = cls(0.5, schedule="one_shot", num_batches=4, fisher_type="empirical", verbose=0)
    pruner = spy_on_stats(record_rows(pruner))
    model = bf16_net(state, lr=0.0)
    make_trainer(max_epochs=1, precision=precision, callbacks=[pruner], limit_val_batches=0).fit(model)
    return pruner, model


@pytest.mark.parametrize("cls", [OBDPruning, OBSPruning])
@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16-true"])
def test_bf16_statistics_are_float32_sums_of_what_the_hooks_saw(precision, cls, trained):
    low, model = one_round(cls, precision, trained)
    ref, _ = one_round(cls, "32-true", trained)
    expected = torch.bfloat16 if precision == "bf16-true" else torch.float32
    assert set(low.dtypes[0].values()) == {expected}  # the precision did reach the weights
    stats = sums(low.stats[0])
    for key, t in stats.items():
        assert t.dtype == (torch.float64 if "count" in key else torch.float32), key
    # the float32 sums are those of the captured (bf16-computed) rows to float32 accuracy (measured
    # 1e-7 of the scale; the same sums accumulated in bf16 are off by 3-5e-3)
    exact = float64_sums(low.stats[0].rows)  # type: ignore[attr-defined]
    assert {k for k in stats if "count" not in k} <= exact.keys()
    for key in (k for k in stats if "count" not in k):
        err = float((stats[key].double() - exact[key]).abs().max())
        assert err <= 1e-5 * float(exact[key].abs().max()), f"{key}: {err}"
    assert {k: v for k, v in stats.items() if "count" in k} == {
        k: v for k, v in sums(ref.stats[0]).items() if "count" in k
    }  # every window batch, as in float32
    # the rows themselves are rounded: input second moments stay within 1% of the float32 run's
    # (per-sample gradient statistics can move more: a bf16 rounding flips ReLUs)
    for key in (k for k in stats if ".A[" in k):
        assert_close_to_scale(stats[key], sums(ref.stats[0])[key], rtol=1e-2, key=key)
    assert low.sparsity == ref.sparsity == pytest.approx(0.5, abs=1e-3)
    params = dict(model.named_parameters())
    for name, mask in low.masks.items():
        assert params[name].dtype == expected and torch.all(params[name][~mask] == 0)
    # the round's loss: OBS's update, written back in the parameter's dtype, compensates as in float32
    low_rec, ref_rec = low.history[-1], ref.history[-1]
    assert low_rec["loss_after"] == pytest.approx(ref_rec["loss_after"], rel=0.03)
    if cls is OBSPruning:
        moved = sum(int((params[n].float() != trained[n])[m].sum()) for n, m in low.masks.items())
        assert moved > 0.5 * sum(int(m.sum()) for m in low.masks.values())  # (dead inputs do not move)
        assert low_rec["actual_loss_increase"] < 1.5 * ref_rec["actual_loss_increase"]


@pytest.mark.parametrize("cls", [OBDPruning, OBSPruning])
@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16-true"])
def test_bf16_masks_stay_frozen_and_rounds_reach_the_target(precision, cls, trained):
    pruner = cls(0.7, num_batches=4, fisher_type="empirical", verbose=0)
    checker = FrozenChecker(pruner)  # pruned weights and their optimizer moments exactly 0.0 after every step
    make_trainer(max_epochs=4, precision=precision, callbacks=[pruner, checker], limit_val_batches=0).fit(
        bf16_net(trained, lr=0.05)
    )
    assert checker.checked >= 16 and len(pruner.history) == 2
    assert pruner.sparsity == pytest.approx(0.7, abs=1e-3)


# ================================================================ b. activation checkpointing
SEQ, BATCHES = 12, 4


class TinyLlama(pl.LightningModule):
    """A 2-layer Llama trained on its own tokens, optionally with gradient checkpointing."""

    def __init__(self, use_reentrant: bool | None = None, lr: float = 0.0) -> None:
        super().__init__()
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        config = LlamaConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=128,
            max_position_embeddings=64,
            use_cache=False,
        )
        self.model = LlamaForCausalLM(config)
        if use_reentrant is not None:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
        self.lr = lr

    def training_step(self, batch, batch_idx):
        (input_ids,) = batch
        return self.model(input_ids, labels=input_ids).loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)

    def train_dataloader(self):
        tokens = torch.randint(0, 128, (4 * BATCHES, SEQ), generator=torch.Generator().manual_seed(0))
        return DataLoader(TensorDataset(tokens), batch_size=4)


def count_training_forwards(module: nn.Module) -> list[int]:
    """Forward calls of ``module`` in training mode (a recomputation counts as a call; the first layer
    of a region, because use_reentrant=False stops recomputing after the last activation it needs)."""
    calls = [0]
    module.register_forward_hook(lambda m, args, out: calls.__setitem__(0, calls[0] + m.training))
    return calls


def llama_round(use_reentrant: bool | None, make: Callable[[], PruningCallback]) -> tuple[PruningCallback, int]:
    model = TinyLlama(use_reentrant)
    calls = count_training_forwards(model.model.model.layers[0].self_attn.q_proj)
    pruner = spy_on_stats(make())
    make_trainer(max_epochs=1, callbacks=[pruner], limit_val_batches=0).fit(model)
    return pruner, calls[0]


CRITERIA: dict[str, Callable[[], PruningCallback]] = {
    "obd-fisher": lambda: OBDPruning(0.3, schedule="one_shot", num_batches=BATCHES, fisher_type="empirical", verbose=0),
    "obs-layerwise": lambda: OBSPruning(0.3, schedule="one_shot", num_batches=BATCHES, verbose=0),
}


@pytest.mark.parametrize("criterion", list(CRITERIA))
@pytest.mark.parametrize("use_reentrant", [True, False])
def test_gradient_checkpointing_gives_the_statistics_of_plain_training(use_reentrant, criterion):
    ref, plain_calls = llama_round(None, CRITERIA[criterion])
    got, calls = llama_round(use_reentrant, CRITERIA[criterion])
    assert plain_calls == BATCHES and calls == 2 * BATCHES  # checkpointing re-ran every window forward
    # no double counting (the counts would double), no missing gradients (counts or sums would drop);
    # the recomputed forward is bitwise the same computation on the CPU
    assert_stats_close(got.stats[0], ref.stats[0], rtol=1e-6)
    assert got.sparsity == ref.sparsity == pytest.approx(0.3, abs=1e-3)
    assert {n: torch.equal(m, ref.masks[n]) for n, m in got.masks.items()} == {n: True for n in ref.masks}


@pytest.mark.parametrize("use_reentrant", [True, False, None])
def test_a_recomputed_forward_is_captured_once(use_reentrant):
    """Each layer keeps one input per step, as without checkpointing: the recomputation of
    use_reentrant=False (which gets no gradient) is not held until the step's end."""
    model = TinyLlama(use_reentrant).train()
    capture = LayerCapture(resolve_targets(model))
    calls = count_training_forwards(model.model.model.layers[0].self_attn.q_proj)
    capture.attach()
    try:
        ids = next(iter(model.train_dataloader()))[0]
        model.training_step((ids,), 0).backward()
        assert calls[0] == (1 if use_reentrant is None else 2)
        assert {n: len(xs) for n, xs in capture._inputs.items()} == {t.name: 1 for t in capture.targets}
        rows = {t.name: (x.shape, g.shape) for t, x, g in capture.drain()}
        assert len(rows) == len(capture.targets)
        assert all(x[:2] == g[:2] == (4, SEQ) for x, g in rows.values())
    finally:
        capture.detach()


# ================================================================ c. torch.compile
class CountingBackend:
    """A torch.compile backend (``aot_eager`` underneath, or another) counting compilations and compiled calls."""

    def __init__(self, backend: str = "aot_eager") -> None:
        from torch._dynamo.backends.registry import lookup_backend

        self.backend = lookup_backend(backend)
        self.compiles = 0
        self.calls = 0

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Callable[..., Any]:
        self.compiles += 1
        compiled = self.backend(gm, example_inputs)

        def run(*args: Any) -> Any:
            self.calls += 1
            return compiled(*args)

        run._boxed_call = getattr(compiled, "_boxed_call", False)  # type: ignore[attr-defined]
        return run


class PlainLoss(TinyNet):
    """TinyNet without ``self.log``, which Lightning's compiled ``training_step`` cannot trace."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)


STYLES = ("torch.compile(submodule)", "module.compile()", "fit(torch.compile(module))")
STEPS_PER_EPOCH = 4


def compiled_net(style: str, backend: CountingBackend, lr: float = 0.05) -> pl.LightningModule:
    pl.seed_everything(0, verbose=False)
    model = PlainLoss(lr=lr, n=STEPS_PER_EPOCH * 32)
    if style == "eager":
        pass
    elif style == "torch.compile(submodule)":
        model.net = torch.compile(model.net, backend=backend)
    elif style == "module.compile()":  # the LightningModule's own forward compiled in place
        model.compile(backend=backend)
    else:  # Lightning unwraps it and compiles forward and training_step
        model = torch.compile(model, backend=backend)
    return model


class StepRecorder(pl.Callback):
    """Per training step: compilations and compiled calls during it, and whether a capture window was open.

    Listed before the pruner, so at batch end the pruner's window is still open and no step round has run.
    """

    def __init__(self, backend: CountingBackend, pruner: PruningCallback | None) -> None:
        self.backend, self.pruner = backend, pruner
        self.steps: list[tuple[int, int, bool]] = []
        self.epoch_start_compiles: list[int] = []

    def on_train_epoch_start(self, trainer, pl_module):
        self.epoch_start_compiles.append(self.backend.compiles)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.start = (self.backend.compiles, self.backend.calls)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        opened = self.pruner._window if self.pruner is not None else None  # its capture: hooks on
        window = opened is not None and opened.capture is not None
        compiles, calls = self.backend.compiles - self.start[0], self.backend.calls - self.start[1]
        self.steps.append((compiles, calls, window))


PRUNERS: dict[str, Callable[[], PruningCallback | None]] = {
    "none": lambda: None,
    "magnitude": lambda: MagnitudePruning(0.7, eval_batches=2, verbose=0),
    "obd-window": lambda: OBDPruning(0.7, num_batches=2, eval_batches=2, fisher_type="empirical", verbose=0),
    "obd-default": lambda: OBDPruning(0.7, num_batches=2, eval_batches=2, verbose=0),  # exact GGN pass at the round
    "obs-layerwise": lambda: OBSPruning(0.7, num_batches=2, eval_batches=2, verbose=0),
}
# compilations a fit makes beyond the dense run's one graph, all at the first round and none later:
# the round's loss measurement (eval mode, no autograd: one more graph), and for the default OBD the
# Fisher-type probe of the loss call (under a TorchFunctionMode: one more). The capture hooks add none.
EXTRA_COMPILES = {"none": 0, "magnitude": 1, "obd-window": 1, "obd-default": 2, "obs-layerwise": 1}


@pytest.mark.parametrize("kind", list(PRUNERS))
def test_capture_hooks_cause_no_recompiles(kind):
    """Three rounds of each pruner on a compiled submodule: masks stay frozen, the rounds reach their
    target, and the hooks compile nothing; the window's steps run eagerly, the others compiled."""
    backend = CountingBackend()
    pruner = PRUNERS[kind]()
    recorder = StepRecorder(backend, pruner)
    callbacks: list[pl.Callback] = [recorder]
    if pruner is not None:
        callbacks += [pruner, checker := FrozenChecker(pruner)]
    epochs = 6
    make_trainer(max_epochs=epochs, callbacks=callbacks, limit_val_batches=0).fit(
        compiled_net("torch.compile(submodule)", backend)
    )
    if pruner is not None:
        assert [r["epoch"] for r in pruner.history] == [0, 1, 2] and pruner.sparsity == pytest.approx(0.7, abs=1e-3)
        assert checker.checked == (epochs - 1) * STEPS_PER_EPOCH
    compiles = [c for c, _, _ in recorder.steps]
    assert compiles[0] == 1 and sum(compiles[1:]) == 0  # no training step compiles after the first
    assert backend.compiles == 1 + EXTRA_COMPILES[kind]
    assert recorder.epoch_start_compiles[1] == backend.compiles  # all at the first round: 3 rounds cost no more
    window = [calls for _, calls, open_ in recorder.steps if open_]
    outside = [calls for _, calls, open_ in recorder.steps if not open_]
    assert len(window) == (3 * 2 if kind in ("obd-window", "obs-layerwise") else 0)  # 2 batches before each round
    assert all(calls == 0 for calls in window)  # the window's steps run eagerly, with the hooks
    assert len(outside) == epochs * STEPS_PER_EPOCH - len(window) and all(calls == 1 for calls in outside)


@pytest.mark.parametrize("style", STYLES)
def test_compiled_training_gives_the_statistics_of_eager_training(style):
    """The window's hooks see every batch of a compiled model: the statistics of the uncompiled run."""
    make = PRUNERS["obd-window"]
    ref = spy_on_stats(make())  # type: ignore[arg-type]
    make_trainer(max_epochs=2, callbacks=[ref], limit_val_batches=0).fit(compiled_net("eager", CountingBackend(), 0))
    got = spy_on_stats(make())  # type: ignore[arg-type]
    backend = CountingBackend()
    make_trainer(max_epochs=2, callbacks=[got], limit_val_batches=0).fit(compiled_net(style, backend, 0))
    assert backend.calls > 0 and len(got.stats) == len(ref.stats) == 1
    assert_stats_close(got.stats[0], ref.stats[0], rtol=1e-5)


@pytest.mark.parametrize("kind", ["magnitude", "obd-window", "obs-layerwise"])
@pytest.mark.parametrize("style", ["module.compile()", "fit(torch.compile(module))"])
def test_compiled_lightning_module_keeps_masks_frozen_and_reaches_the_target(style, kind):
    """The compiled-submodule style is covered with every pruner above; here the LightningModule's
    own forward (and with Lightning's route, its training_step) is compiled."""
    pruner = PRUNERS[kind]()  # type: ignore[assignment]
    checker = FrozenChecker(pruner)
    backend = CountingBackend()
    make_trainer(max_epochs=4, callbacks=[pruner, checker], limit_val_batches=0).fit(compiled_net(style, backend))
    assert backend.calls > 0  # the compiled graphs did train
    assert checker.checked == 3 * STEPS_PER_EPOCH and pruner.sparsity == pytest.approx(0.7, abs=1e-3)


@pytest.mark.slow
def test_inductor_compiled_training_prunes_as_eager_training():
    """The real compiler (inductor, C++ code generation: about a minute on 2 cores): three OBD rounds
    on a compiled submodule freeze their masks and compile nothing for the hooks, and the first
    round's statistics are the eager run's (up to inductor's reordering of float32 sums)."""
    ref = spy_on_stats(PRUNERS["obd-window"]())  # type: ignore[arg-type]
    make_trainer(max_epochs=6, callbacks=[ref], limit_val_batches=0).fit(compiled_net("eager", CountingBackend()))
    backend = CountingBackend("inductor")
    pruner = spy_on_stats(PRUNERS["obd-window"]())  # type: ignore[arg-type]
    recorder, checker = StepRecorder(backend, pruner), FrozenChecker(pruner)
    make_trainer(max_epochs=6, callbacks=[recorder, pruner, checker], limit_val_batches=0).fit(
        compiled_net("torch.compile(submodule)", backend)
    )
    assert [r["epoch"] for r in pruner.history] == [0, 1, 2] and pruner.sparsity == pytest.approx(0.7, abs=1e-3)
    assert checker.checked == 5 * STEPS_PER_EPOCH
    assert backend.compiles == 1 + EXTRA_COMPILES["obd-window"] and sum(c for c, _, _ in recorder.steps[1:]) == 0
    assert all(calls == (0 if open_ else 1) for _, calls, open_ in recorder.steps)
    assert_stats_close(pruner.stats[0], ref.stats[0], rtol=1e-4)


def test_captures_of_several_pruners_release_compilation_in_any_order():
    backend = CountingBackend()
    f = torch.compile(lambda x: x.sin() + 1, backend=backend)
    targets = resolve_targets(nn.Sequential(nn.Linear(3, 3)))
    a, b = LayerCapture(targets), LayerCapture(targets)
    x = torch.randn(3)
    a.attach()
    b.attach()
    f(x)
    a.detach()  # b still holds its hooks: still eager
    f(x)
    assert backend.calls == 0
    b.detach()
    a.detach()  # a second detach is harmless and does not release b's hold twice
    f(x)
    assert backend.compiles == 1 and backend.calls == 1


def test_hutchinson_on_a_compiled_model_is_refused_at_fit_start():
    def hutchinson() -> OBDPruning:
        return OBDPruning(0.5, curvature="hutchinson", schedule="one_shot", num_batches=2, num_probes=2, verbose=0)

    model = compiled_net("torch.compile(submodule)", CountingBackend())
    with pytest.raises(ValueError, match=r"curvature='hutchinson'.*\['net'\] are compiled"):
        make_trainer(max_epochs=1, callbacks=[hutchinson()]).fit(model)
    pruner = hutchinson()  # the refusal is about compile: the same model uncompiled prunes
    make_trainer(max_epochs=1, callbacks=[pruner], limit_val_batches=0).fit(compiled_net("eager", CountingBackend()))
    assert pruner.sparsity == pytest.approx(0.5, abs=1e-3)


def test_without_set_stance_curvature_on_a_compiled_model_is_refused_at_fit_start(monkeypatch):
    """torch < 2.6 cannot run the capture eagerly under compile: refused, naming what is compiled."""
    monkeypatch.delattr(torch.compiler, "set_stance")
    model = compiled_net("module.compile()", CountingBackend())
    with pytest.raises(RuntimeError, match=r"no torch.compiler.set_stance.*\['PlainLoss'\] are compiled"):
        make_trainer(max_epochs=1, callbacks=[PRUNERS["obd-window"]()]).fit(model)
    pruner = MagnitudePruning(0.5, verbose=0)  # magnitude needs no hooks: still fine
    make_trainer(max_epochs=2, callbacks=[pruner], limit_val_batches=0).fit(
        compiled_net("module.compile()", CountingBackend())
    )
    assert pruner.sparsity == pytest.approx(0.5, abs=1e-3)

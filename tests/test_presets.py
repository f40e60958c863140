"""Named algorithms are the flags they stand for; trigger arguments are written once, in ``Schedule``."""

from __future__ import annotations

import copy
import inspect

import pytest
import torch
from conftest import TinyNet, make_trainer
from test_readme import hf

from lightning_prune import (
    GMP,
    OBC,
    OBD,
    MagnitudePruning,
    OBDPruning,
    OBSPruning,
    Pruner,
    SparseGPT,
    Wanda,
    WoodFisher,
    presets,
    prune,
)
from lightning_prune.engine.schedule import Schedule, schedule_parameters

SEQUENTIAL = dict(allocation="reconstruction", scope="layer", blocks="auto", reconstruct="current")
FLAGS = {
    SparseGPT: (OBSPruning, dict(**SEQUENTIAL, solver="fast", solver_dtype="float32")),
    OBC: (OBSPruning, dict(**SEQUENTIAL, solver="exact")),
    Wanda: (OBDPruning, dict(curvature="activations", scope="row")),
    WoodFisher: (OBSPruning, dict(hessian="fisher", fisher_type="empirical")),
    OBD: (OBDPruning, dict(curvature="fisher")),
    GMP: (MagnitudePruning, dict(schedule="cubic", scope="layer")),
}  # fmt: skip
LABEL_FREE = {SparseGPT, OBC, Wanda}


def lm_batches() -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 64, (4, 16), generator=g)
    return [{"input_ids": ids.roll(i, 1), "labels": ids.roll(i, 1)} for i in range(4)]


@pytest.mark.parametrize("preset", list(FLAGS), ids=lambda p: p.__name__)
def test_a_preset_prunes_exactly_as_its_flags(preset):
    cls, flags = FLAGS[preset]
    made, flagged = preset(0.5, num_batches=4, verbose=0), cls(0.5, num_batches=4, verbose=0, **flags)
    assert type(made) is cls
    assert vars(made.criterion) == vars(flagged.criterion)
    assert (made.scope, str(made.pattern), made.schedule.when) == (
        flagged.scope,
        str(flagged.pattern),
        flagged.schedule.when,
    )
    model = hf("llama")
    twin = copy.deepcopy(model)
    data = lm_batches()
    prune(model, data, made)
    prune(twin, data, flagged)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), twin.state_dict().values()))
    assert made.sparsity == pytest.approx(0.5, abs=0.01)


def test_options_override_a_preset_and_unknown_ones_are_refused():
    nm = SparseGPT(0.5, pattern="2:4", verbose=0)
    assert str(nm.pattern) == "2:4" and nm.criterion.solver == "fast"
    assert GMP(0.8, every_n_steps=10, verbose=0).schedule.when.every == 10
    with pytest.raises(TypeError, match="OBSPruning\\(\\) got an unexpected keyword argument 'curvature'"):
        SparseGPT(0.5, curvature="fisher")
    with pytest.raises(ValueError, match="`solver` must be one of"):
        OBC(0.5, solver="slow")


def test_trigger_arguments_are_defined_once_and_every_signature_lists_them():
    triggers = [p.name for p in schedule_parameters()]
    assert triggers == list(inspect.signature(Schedule.__init__).parameters)[2:]
    for fn in (
        Pruner.__init__,
        MagnitudePruning.__init__,
        OBDPruning.__init__,
        OBSPruning.__init__,
        *presets.PRESETS.values(),
    ):
        params = inspect.signature(fn).parameters
        assert all(params[t].kind is inspect.Parameter.KEYWORD_ONLY for t in triggers), fn
    assert inspect.signature(SparseGPT).parameters["solver"].default == "fast"  # the preset's own values
    assert inspect.signature(GMP).parameters["scope"].default == "layer"


def test_a_preset_is_a_callback_in_a_trainer():
    model = TinyNet()
    pruner = GMP(0.75, every_n_steps=4, end_step=12, verbose=0)
    make_trainer(max_steps=16, max_epochs=-1, callbacks=[pruner]).fit(model)
    assert [r["global_step"] for r in pruner.history] == [4, 8, 12]
    assert pruner.sparsity == pytest.approx(0.75, abs=0.01)
    assert all(
        r["layer_sparsity"][n] == pytest.approx(r["target_sparsity"], abs=0.02)
        for r in pruner.history
        for n in r["layer_sparsity"]
    )


def test_wanda_with_channels_compares_structures_as_the_flags_do():
    """Wanda(pattern="channels") (Wanda-sp): a row holds no whole head or neuron, so the preset's row scope
    gives way to the pattern's own, exactly as the flags without a scope; an explicit scope still wins."""
    pytest.importorskip("transformers")
    masks = []
    for make in (lambda: Wanda(0.5, pattern="channels", verbose=0),
                 lambda: OBDPruning(0.5, curvature="activations", pattern="channels", verbose=0)):  # fmt: skip
        model, pruner = hf("llama"), make()
        prune(model, lm_batches(), pruner, num_batches=4)
        masks.append(pruner.masks)
        assert 0 < pruner.sparsity < 1
    assert masks[0].keys() == masks[1].keys()
    assert all(torch.equal(masks[0][k], masks[1][k]) for k in masks[0])
    with pytest.raises(ValueError, match="scope='row'"):
        Wanda(0.5, pattern="channels", scope="row", verbose=0)


def test_a_criterion_declares_its_options_once_and_its_callback_and_presets_take_them():
    """The typed callbacks' and the presets' signatures, defaults, annotations and documented arguments are
    the criterion's own; a new criterion needs its file and one class statement."""
    from typing import get_args

    from lightning_prune import callbacks
    from lightning_prune.callbacks.base import PruningCallback
    from lightning_prune.criteria import OBD as OBDCriterion
    from lightning_prune.criteria import OBS, Criterion, Magnitude, RoundResult
    from lightning_prune.criteria.base import options_doc, options_of
    from lightning_prune.criteria.obs import HESSIANS, Hessian
    from lightning_prune.engine.pruner import pruner_parameters

    assert tuple(HESSIANS) == get_args(Hessian)
    pruner_names = [p.name for p in pruner_parameters()]
    for cls, factory in ((OBSPruning, OBS), (OBDPruning, OBDCriterion), (MagnitudePruning, Magnitude)):
        own = {p.name: p for p in options_of(factory)}
        params = inspect.signature(cls).parameters
        assert list(params) == ["target", *own, *pruner_names], cls
        assert all((params[n].default, params[n].annotation) == (p.default, p.annotation) for n, p in own.items())
        assert callbacks.callback_for(factory) is cls and options_doc(factory) in inspect.getdoc(cls)
        assert all(inspect.getdoc(cls).count(f"\n    {n}: ") == 1 for n in own), cls  # each option documented, once
    assert OBSPruning(0.5, "kfac", verbose=0).criterion.hessian == "kfac"  # positional, as before
    assert OBDPruning(0.5, "kfac", 4, verbose=0).criterion.num_probes == 4
    with pytest.raises(TypeError, match="got multiple values for argument 'hessian'"):
        OBSPruning(0.5, "kfac", hessian="fisher")
    with pytest.raises(TypeError, match=r"MagnitudePruning\(\) takes at most 1 positional arguments \(2 given\)"):
        MagnitudePruning(0.5, "global")

    class Power(Criterion):
        """Prune the weights with the smallest ``|w| ** power``.

        Args:
            power: the exponent.
        """

        def __init__(self, power: float = 1.0) -> None:
            self.power = power

        def window_length(self, num_batches: int, eval_batches: int) -> int:
            return min(num_batches, eval_batches)

        def prune(self, ctx):
            return RoundResult(ctx.select({t.name: t.local_param.abs() ** self.power for t in ctx.targets}))

    class PowerPruning(PruningCallback, criterion=Power):
        """Magnitude to a power, as a callback.

        Other arguments: see Pruner.
        """

    assert list(inspect.signature(PowerPruning).parameters)[:2] == ["target", "power"]
    assert inspect.getdoc(PowerPruning) == (
        "Magnitude to a power, as a callback.\n\nArgs:\n    power: the exponent.\n\nOther arguments: see Pruner."
    )
    model, twin = TinyNet(), TinyNet()
    twin.load_state_dict(model.state_dict())
    batches = [next(iter(model.train_dataloader()))]
    prune(model, batches, PowerPruning(0.5, power=2.0, verbose=0))
    prune(twin, batches, MagnitudePruning(0.5, verbose=0))  # |w|^2 ranks as |w|
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), twin.state_dict().values()))


def test_every_preset_returns_the_pruner_contract():
    """A preset returns its criterion's typed callback (Lightning installed; the architecture test checks the
    core Pruner without it): the PrunerLike contract, for prune() and for a Trainer alike."""
    from lightning_prune import callbacks
    from lightning_prune.engine.facade import PrunerLike

    for name, fn in presets.PRESETS.items():
        made = fn(0.5, verbose=0)
        factory = presets._SETTINGS[name][0]
        assert type(made) is callbacks.callback_for(factory) and isinstance(made, callbacks.PruningCallback)
        assert inspect.signature(fn).return_annotation is PrunerLike
        assert isinstance(made.pruner, Pruner) and made.history == () and made.target == 0.5

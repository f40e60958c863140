import math

import pytest

from lightning_prune import MagnitudePruning
from lightning_prune.engine.schedule import Schedule


def test_cubic_matches_zhu_gupta():
    s = Schedule(0.9, "cubic", start_epoch=2, end_epoch=6, every_n_epochs=2)
    assert s.points == [2, 4, 6]
    for k, epoch in enumerate([2, 4, 6]):
        p = (k + 1) / 3
        assert s.sparsity_at(epoch) == pytest.approx(0.9 + (0.0 - 0.9) * (1 - p) ** 3)
    assert s.sparsity_at(6) == 0.9


def test_linear_and_one_shot():
    s = Schedule(0.8, "linear", 0, 3)
    assert [s.sparsity_at(e) for e in s.points] == pytest.approx([0.2, 0.4, 0.6, 0.8])
    o = Schedule(0.8, "one_shot", start_epoch=5)
    assert o.points == [5] and o.sparsity_at(5) == 0.8 and not o.is_round(4)


def test_callable_schedule():
    s = Schedule(0.5, lambda e: min(0.5, 0.1 * (e + 1)), 0, 4)
    assert [s.sparsity_at(e) for e in s.points] == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.5])


@pytest.mark.parametrize("max_epochs,rounds", [(10, [0, 1, 2, 3, 4]), (3, [0, 1]), (1, [0]), (7, [0, 1, 2, 3])])
def test_default_end_leaves_fine_tuning_epochs(max_epochs, rounds):
    s = Schedule(0.8)
    s.resolve(max_epochs)
    assert s.points == rounds
    if max_epochs > 1:
        assert max_epochs - 1 - s.points[-1] >= 1  # at least one epoch of fine-tuning


def test_default_end_with_start_epoch():
    s = Schedule(0.8, start_epoch=4, every_n_epochs=2)
    s.resolve(12)
    assert s.points == [4, 6]  # rounds in epochs 4..7, fine-tuning 8..11


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(target=1.0), "`target` must be a number in \\[0, 1\\), got 1.0"),
        (dict(target=-0.1), "`target`.*-0.1"),
        (dict(target=float("nan")), "`target`.*nan"),
        (dict(target="0.5"), "`target`.*'0.5'"),
        (dict(target=0.5, schedule="exp"), "`schedule` must be one of .* got 'exp'"),
        (dict(target=0.5, start_epoch=3, end_epoch=2), "`end_epoch` \\(2\\) must be >= `start_epoch` \\(3\\)"),
        (dict(target=0.5, start_epoch=-1), "`start_epoch`.*-1"),
        (dict(target=0.5, every_n_epochs=0), "`every_n_epochs`.*0"),
        (dict(target=0.5, schedule=lambda e: 0.5 - 0.1 * e, end_epoch=3), "non-decreasing"),
        (dict(target=0.5, schedule=lambda e: 1.5, end_epoch=3), "invalid sparsity.*1.5"),
        (dict(target=0.5, schedule=lambda e: 0.1 * e, end_epoch=2), "must reach `target`"),
    ],
)
def test_bad_schedule_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Schedule(**kwargs)
    with pytest.raises(ValueError, match=match):
        MagnitudePruning(**kwargs)


def test_unresolvable_without_max_epochs():
    s = Schedule(0.5)
    with pytest.raises(ValueError, match="`end_epoch` is required"):
        s.resolve(-1)
    with pytest.raises(ValueError, match="`start_epoch` \\(5\\) must be < Trainer\\(max_epochs=5\\)"):
        Schedule(0.5, start_epoch=5).resolve(5)


def test_cubic_front_loads():
    s = Schedule(0.9, "cubic", 0, 9)
    values = [s.sparsity_at(e) for e in s.points]
    increments = [b - a for a, b in zip([0.0, *values[:-1]], values)]
    assert all(a >= b for a, b in zip(increments, increments[1:]))
    assert math.isclose(values[-1], 0.9)

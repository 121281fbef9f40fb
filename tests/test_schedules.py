"""Curriculum shapes at e = 0, E/2, E, and in between; learning-rate schedules and the paper optimizer (train/lr)."""
import math

import pytest

from trainers.schedules import SHAPES, curriculum

E = 10
EXPECT = {   # f(0), f(E/2), f(E)
    "quadratic": (1.0, 0.25, 0.0),
    "linear": (1.0, 0.5, 0.0),
    "cosine": (1.0, 0.5, 0.0),
    "step": (1.0, 0.0, 0.0),
    "constant": (1.0, 1.0, 1.0),
}


@pytest.mark.parametrize("shape", sorted(EXPECT))
def test_values_at_start_middle_end(shape):
    got = tuple(curriculum(shape, e, E) for e in (0, E / 2, E))
    assert got == pytest.approx(EXPECT[shape])


@pytest.mark.parametrize("power", [0.5, 1.0, 3.0])
def test_power(power):
    assert curriculum("power", 0, E, power) == 1.0 and curriculum("power", E, E, power) == 0.0
    assert curriculum("power", E / 2, E, power) == pytest.approx(0.5 ** power)
    assert curriculum("power", 3, E, 2.0) == pytest.approx(curriculum("quadratic", 3, E))


@pytest.mark.parametrize("shape", SHAPES)
def test_monotone_in_unit_interval_and_clamped(shape):
    values = [curriculum(shape, e, E) for e in range(-2, E + 3)]
    assert all(0.0 <= v <= 1.0 for v in values)
    assert all(a >= b for a, b in zip(values, values[1:]))
    assert curriculum(shape, E + 5, E) == curriculum(shape, E, E)


def test_quadratic_is_the_papers_formula():
    for e in range(E + 1):
        assert curriculum("quadratic", e, E) == pytest.approx((1 - e / E) ** 2)
    assert curriculum("cosine", 2.5, E) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))


def test_bad_input():
    with pytest.raises(ValueError, match="unknown curriculum shape 'expo'"):
        curriculum("expo", 0, E)
    with pytest.raises(ValueError, match="epochs must be positive"):
        curriculum("linear", 0, 0)


# --------------------------------------------------------------------------- learning-rate schedules (train/lr)

STEPS = 4                      # tiny(): 32 training images, batch 8, one rank, drop_last
EPOCHS = 3


def lr_per_epoch(**schedule) -> tuple[list[float], dict]:
    """train/lr at the end of each epoch of a tiny fit, and the last checkpoint's optimizer state."""
    from conftest import tiny
    from trainers.loop import fit

    reports = []
    fit(tiny(schedule={"epochs": EPOCHS, **schedule}), lambda m, s: reports.append((m["train/lr"], s["optimizer"])))
    return [lr for lr, _ in reports], reports[-1][1]


@pytest.mark.parametrize("shape, factor", [
    ("poly", lambda t: (1 - t) ** 0.9),                 # mmseg / SSSegmentation: lr (1 - k/T)^power per step
    ("cosine", lambda t: 0.5 * (1 + math.cos(math.pi * t))),
    ("constant", lambda t: 1.0),
])
def test_lr_schedules_follow_their_closed_form_per_step(shape, factor):
    lr = 0.004
    got, _ = lr_per_epoch(lr=lr, lr_schedule=shape, poly_power=0.9)
    # after epoch e the scheduler has stepped e * STEPS times out of EPOCHS * STEPS
    assert got == pytest.approx([lr * factor(e * STEPS / (EPOCHS * STEPS)) for e in range(1, EPOCHS + 1)],
                                rel=1e-9, abs=1e-15)


def test_paper_profile_trains_with_sgd_momentum_and_poly_09():
    """The VOC paper preset's optimizer and schedule (SGD lr 0.01, momentum 0.9, weight decay 5e-4, poly 0.9, as
    SSSegmentation's fcn_resnet50os8_voc) on the tiny embedded data: the lr of every epoch and the SGD state."""
    from orchestrator.spec import load_preset

    sched = load_preset("paper_voc_fcn_r50", "test")["schedule"]
    keys = ("lr", "optimizer", "momentum", "weight_decay", "lr_schedule", "poly_power")
    assert {k: sched[k] for k in keys} == {"lr": 0.01, "optimizer": "sgd", "momentum": 0.9, "weight_decay": 0.0005,
                                           "lr_schedule": "poly", "poly_power": 0.9}
    got, optimizer = lr_per_epoch(**{k: sched[k] for k in keys})
    assert got == pytest.approx([0.01 * (1 - e / EPOCHS) ** 0.9 for e in range(1, EPOCHS + 1)], rel=1e-9, abs=1e-15)
    (group,) = optimizer["param_groups"]
    assert (group["momentum"], group["weight_decay"], group["nesterov"]) == (0.9, 0.0005, False)
    assert group["initial_lr"] == 0.01                 # torch.optim.SGD: its state has momentum buffers
    assert optimizer["state"] and all("momentum_buffer" in s for s in optimizer["state"].values())

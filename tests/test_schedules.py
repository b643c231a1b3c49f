"""Sparsity schedules (the cubic schedule of the SWAP paper) and the rules of schedules.resolve()."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import swapjax
from swapjax import schedules


def test_cubic_schedule_matches_published_example():
    # The paper's example: T = 9, s_f = 0.95 (values given to 4 decimals there).
    expected = [0.0, 0.3136, 0.5492, 0.7181, 0.8312, 0.8999, 0.9352, 0.9481, 0.95]
    got = swapjax.cubic_schedule(0.95, 9)
    assert isinstance(got, tuple) and len(got) == 9
    np.testing.assert_allclose(got, expected, atol=1e-4)
    assert got[-1] == 0.95  # the last stage is exactly the final sparsity, not a rounding of it
    assert all(isinstance(s, float) for s in got)


def test_cubic_schedule_formula_with_initial():
    # s_t = s_f + (s_0 - s_f)(1 - (t-1)/(T-1))^3, computed here independently
    T, s0, sf = 5, 0.2, 0.8
    expected = [sf + (s0 - sf) * (1 - (t - 1) / (T - 1)) ** 3 for t in range(1, T + 1)]
    np.testing.assert_allclose(swapjax.cubic_schedule(sf, T, initial=s0), expected, rtol=0, atol=1e-12)
    assert swapjax.cubic_schedule(sf, T, initial=s0)[0] == pytest.approx(s0, abs=1e-12)


@pytest.mark.parametrize("fn", [swapjax.cubic_schedule, swapjax.linear_schedule])
def test_one_stage_is_one_shot(fn):
    assert fn(0.9, 1) == (0.9,)
    assert fn(0.37, 1, initial=0.2) == (0.37,)


def test_linear_schedule_is_evenly_spaced():
    np.testing.assert_allclose(swapjax.linear_schedule(0.8, 5), [0.0, 0.2, 0.4, 0.6, 0.8], atol=1e-12)
    np.testing.assert_allclose(swapjax.linear_schedule(0.9, 4, initial=0.3), [0.3, 0.5, 0.7, 0.9], atol=1e-12)


def test_polynomial_schedule_power_two():
    got = swapjax.polynomial_schedule(1.0 - 0.1, 3, power=2)
    np.testing.assert_allclose(got, [0.0, 0.9 - 0.9 * 0.25, 0.9], atol=1e-12)


@pytest.mark.parametrize("stages", [0, -2, 2.5])
def test_bad_stage_count_names_stages(stages):
    with pytest.raises(ValueError, match="stages"):
        swapjax.cubic_schedule(0.9, stages)


@settings(max_examples=30, deadline=None)
@given(T=st.integers(1, 25), final=st.floats(0.0, 0.999), power=st.sampled_from([1, 2, 3]))
def test_schedules_are_monotone_end_at_final_and_resolve_accepts_them(T, final, power):
    s = swapjax.polynomial_schedule(final, T, power=power)
    assert len(s) == T
    assert s[-1] == final
    assert all(0 <= a <= b for a, b in zip(s, s[1:]))
    # A schedule swapjax generates is a valid explicit schedule for the same final sparsity.
    assert schedules.resolve(s, final) == s
    assert schedules.resolve(list(s), final) == s


# ---------------------------------------------------------------- resolve()


def test_resolve_int_is_cubic():
    assert schedules.resolve(9, 0.95) == swapjax.cubic_schedule(0.95, 9)
    assert schedules.resolve(1, 0.5) == (0.5,)


def test_resolve_numpy_int_is_cubic():
    # A stage count taken from numpy (np.arange sweeps, np.int64 config values) is an int T too.
    assert schedules.resolve(np.int64(3), 0.9) == swapjax.cubic_schedule(0.9, 3)


def test_resolve_explicit_sequence_taken_as_given():
    assert schedules.resolve([0.5, 0.5, 0.9], 0.9) == (0.5, 0.5, 0.9)
    got = schedules.resolve(np.array([0.1, 0.4, 0.7]), 0.7)
    assert got == pytest.approx((0.1, 0.4, 0.7)) and all(type(v) is float for v in got)


@pytest.mark.parametrize(
    "levels, final, match",
    [
        ([], 0.9, "stages: an explicit schedule needs at least one"),
        ([0.5, 0.3, 0.9], 0.9, "stages: sparsities must be non-decreasing"),
        ([0.3, 0.6], 0.9, "stages: the schedule must end at sparsity=0.9"),
        ([0.3, 0.6, 0.9], 0.6, "stages: .*end at sparsity=0.6"),
        ([-0.1, 0.5], 0.5, r"stages: every sparsity must be in \[0, 1\)"),
        ([0.5, 1.0], 1.0, r"stages: every sparsity must be in \[0, 1\)"),
    ],
)
def test_resolve_rejects_bad_explicit_schedules(levels, final, match):
    with pytest.raises(ValueError, match=match):
        schedules.resolve(levels, final)


def test_resolve_bad_int_names_stages():
    with pytest.raises(ValueError, match="stages"):
        schedules.resolve(0, 0.9)


# issue 32: what stages="auto" runs where X is not held in memory, a hook that would never run, the bound


@pytest.mark.parametrize("compared, finetuned, mode, count, says", [
    (True, False, "in-memory", schedules.AUTO_STAGES, ""),
    (False, False, "in-memory", 1, ""),
    (True, False, "blocked", 1, "stages='auto': one stage (one-shot), as X is held blocked and each stage costs a "
                                "gradient pass per block; stages=8 asks for the gradual prune"),
    (True, False, "matrix-free", 1, "as X is held matrix-free and each stage costs forward passes per product"),
    (False, False, "blocked", 1, ""),
    (False, True, "in-memory", schedules.AUTO_STAGES, ""),
    (False, True, "blocked", schedules.AUTO_STAGES, "stages='auto' with finetune: 8 stages fine-tuned between, each "
                                                    "with a gradient pass per block (X held blocked)"),
])
def test_auto_schedule_weighs_what_a_stage_costs(compared, finetuned, mode, count, says):
    got, line = schedules.auto(compared, finetuned, mode)
    assert got == count and (says in line if says else line == "")


def test_idle_hook_says_when_no_stage_before_the_last_prunes():
    assert "the stages before the last (0) keep all p = 100 weights" in schedules.idle_hook(swapjax.cubic_schedule(0.9, 2), 100)
    assert "one stage" in schedules.idle_hook((0.9,), 100)
    assert schedules.idle_hook(swapjax.cubic_schedule(0.9, 3), 100) == ""
    # 0.004 keeps round(0.996 · 100) = 100: skipped as well
    assert schedules.idle_hook((0.004, 0.9), 100) != "" and schedules.idle_hook((0.006, 0.9), 100) == ""


def test_stage_count_bound():
    from swapjax import checks

    assert checks.stages(checks.MAX_STAGES) == checks.MAX_STAGES
    with pytest.raises(ValueError, match="stages: at most 1000"):
        checks.stages(checks.MAX_STAGES + 1)

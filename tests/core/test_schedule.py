import pytest

from birdbone.core.schedule import step_shares, wave_count, wave_targets


@pytest.mark.parametrize("schedule", ["constant", "linear", "cubic"])
@pytest.mark.parametrize(("target", "cap"), [(0.5, 0.1), (0.7, 0.1), (0.5, 0.25), (0.9, 0.2), (0.05, 0.1)])
def test_waves_reach_the_target_and_never_pass_the_cap(schedule, target, cap):
    targets = wave_targets(schedule, target, cap)
    assert targets[-1] == target
    assert targets == sorted(targets)
    assert max(step_shares(targets)) <= cap + 1e-12
    assert len(targets) == wave_count(schedule, target, cap)
    if len(targets) > 1:  # one wave fewer would pass the cap
        fewer = {"constant": None}.get(schedule, len(targets) - 1)
        if fewer:
            with pytest.raises(ValueError, match="above the cap"):
                wave_targets(schedule, target, cap, fewer)


def test_constant_removes_the_cap_of_what_is_left():
    targets = wave_targets("constant", 0.5, 0.1)
    assert len(targets) == 7  # 0.9 ** 6 = 0.53 > 0.5 >= 0.9 ** 7 = 0.48
    assert targets[:3] == pytest.approx([0.1, 0.19, 0.271])


def test_cubic_front_loads():
    shares = step_shares(wave_targets("cubic", 0.5, 0.1))
    assert shares == sorted(shares, reverse=True)


def test_bad_targets():
    with pytest.raises(ValueError, match="outside"):
        wave_targets("linear", 1.0, 0.1)
    with pytest.raises(ValueError, match="unknown schedule"):
        wave_targets("exponential", 0.5, 0.1)
    assert wave_targets("linear", 0.0, 0.1) == []

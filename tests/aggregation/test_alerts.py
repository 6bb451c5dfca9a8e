from __future__ import annotations

from stream_sentiment.aggregation.alerts import AlertRules, AlertState, Baseline, WindowStats, evaluate

RULES = AlertRules(ratio_threshold=0.6, min_posts=50, surge_z=3.0, ewma_alpha=0.2, cooldown_seconds=300)


def window(negative: int, posts: int = 200, value: str = "airline") -> WindowStats:
    return WindowStats(60, "topic", value, posts, negative, negative * 0.9)


def test_surge_after_a_steady_baseline_raises_one_alert_not_a_storm():
    state = AlertState()
    fired = []
    for minute in range(20):  # steady: ~20 negative posts a minute
        fired += evaluate(window(18 + minute % 5), state, RULES, now=minute * 60.0)
    assert fired == []
    for minute in range(20, 26):  # the surge lasts six windows
        fired += evaluate(window(70), state, RULES, now=minute * 60.0)
    surges = [a for a in fired if a.rule == "surge"]
    assert len(surges) == 1  # cooldown: one incident, one alert
    assert surges[0].z >= 3.0 and 15 < surges[0].baseline_mean < 25
    assert surges[0].at == 20 * 60.0


def test_a_new_incident_after_a_quiet_cooldown_alerts_again():
    state = AlertState()
    for minute in range(10):
        evaluate(window(20), state, RULES, now=minute * 60.0)
    first = evaluate(window(80), state, RULES, now=600.0)
    during = evaluate(window(80), state, RULES, now=660.0)
    for minute in range(12, 17):  # quiet for five windows: 660 -> 1020 s > cooldown
        assert evaluate(window(20), state, RULES, now=minute * 60.0) == []
    too_soon = AlertState(dict(state.baselines), dict(state.last_active))
    assert evaluate(window(80), too_soon, RULES, now=900.0) == []  # 240 s after the incident's end
    again = evaluate(window(80), state, RULES, now=1020.0)
    assert [a.rule for a in first] == ["surge"] and during == [] and [a.rule for a in again] == ["surge"]


def test_ratio_rule_needs_enough_posts():
    state = AlertState()
    assert evaluate(window(30, posts=40), state, RULES, now=0.0) == []  # 75% of 40: too few posts
    fired = evaluate(window(130, posts=200), state, RULES, now=60.0)
    assert [a.rule for a in fired] == ["ratio"]


def test_dimensions_have_separate_baselines_and_cooldowns():
    state = AlertState()
    for minute in range(10):
        evaluate(window(20, value="a"), state, RULES, now=minute * 60.0)
        evaluate(window(60, value="b"), state, RULES, now=minute * 60.0)
    assert evaluate(window(60, value="b"), state, RULES, now=600.0) == []  # b's normal
    assert [a.rule for a in evaluate(window(60, value="a"), state, RULES, now=600.0)] == ["surge"]


def test_flat_baseline_does_not_turn_one_post_into_an_infinite_z():
    baseline = Baseline()
    for _ in range(10):
        baseline = baseline.updated(0, 0.2)
    assert baseline.z_score(1) == 1.0

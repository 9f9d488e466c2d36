import json

import pytest
import torch

from tokencredit.rewards.ser_selection import (
    LoopRecord,
    PseudoLabel,
    Selection,
    SelectionRule,
    SERState,
    select_pairs,
    should_stop,
    stop_reason,
)

S1, S2, BOTH = SelectionRule(status=1), SelectionRule(status=2), SelectionRule(status="both")


def kept(p_a, p_b, rule):
    """{index: (chosen side, rules)} of the kept pairs."""
    return {s.index: (s.chosen, s.rules) for s in select_pairs(p_a, p_b, rule).selected}


# ------------------------------------------------------------------ SelectionRule
def test_rule_defaults_are_the_papers():
    rule = SelectionRule()
    assert (rule.status, rule.high, rule.low, rule.min_gap) == ("both", 0.55, 0.45, 0.3)
    assert rule.active == (1, 2) and S1.active == (1,) and S2.active == (2,)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(status=3), "status"),
        (dict(status="1"), "status"),
        (dict(status=True), "status"),
        (dict(low=0.6, high=0.5), "low <= high"),
        (dict(low=0.0), "low <= high"),
        (dict(high=1.0), "low <= high"),
        (dict(min_gap=0.0), "min_gap"),
        (dict(min_gap=1.0), "min_gap"),
    ],
)
def test_rule_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SelectionRule(**kwargs)


def test_rule_allows_low_equal_high():
    assert SelectionRule(status=1, low=0.5, high=0.5).high == 0.5


# ------------------------------------------------------------------ status 1
def test_status1_hand_cases_around_thresholds():
    p_a = [0.56, 0.55, 0.56, 0.56, 0.90, 0.50, 0.44]
    p_b = [0.44, 0.44, 0.45, 0.46, 0.10, 0.40, 0.56]
    # 0: just inside both bounds; 1: p_a exactly at high; 2: p_b exactly at low; 3: p_b above low;
    # 4: clear; 5: p_a between the bounds; 6: swapped, b is chosen.
    assert kept(p_a, p_b, S1) == {0: ("a", (1,)), 4: ("a", (1,)), 6: ("b", (1,))}


def test_status1_is_symmetric_under_swap():
    p_a = [0.56, 0.55, 0.9, 0.5, 0.3]
    p_b = [0.44, 0.44, 0.1, 0.4, 0.7]
    straight = kept(p_a, p_b, S1)
    swapped = kept(p_b, p_a, S1)
    assert straight.keys() == swapped.keys() == {0, 2, 4}
    flip = {"a": "b", "b": "a"}
    assert all(swapped[i] == (flip[side], rules) for i, (side, rules) in straight.items())


def test_status1_with_custom_thresholds():
    rule = SelectionRule(status=1, high=0.7, low=0.3)
    assert kept([0.69, 0.71, 0.71], [0.2, 0.29, 0.3], rule) == {1: ("a", (1,))}


# ------------------------------------------------------------------ status 2
def test_status2_hand_cases_around_gap():
    p_a = [0.8, 0.81, 0.5, 0.6, 0.2, 0.99, 0.65]
    p_b = [0.5, 0.5, 0.81, 0.5, 0.5, 0.0, 0.35]
    # 0: gap exactly 0.3 (float gives 0.30000000000000004, still "at"); 1: 0.31; 2: swapped 0.31;
    # 3: 0.1; 4: exactly 0.3 the other way; 5: 0.99; 6: exactly 0.3 again.
    assert kept(p_a, p_b, S2) == {1: ("a", (2,)), 2: ("b", (2,)), 5: ("a", (2,))}


def test_status2_fires_where_status1_cannot():
    # Both above high, yet far apart: only "amplify difference" keeps it.
    assert kept([0.95], [0.6], S1) == {}
    assert kept([0.95], [0.6], S2) == {0: ("a", (2,))}
    # Straddling the bounds with a small gap: only "tell good from bad" keeps it.
    assert kept([0.56], [0.44], S2) == {}


# ------------------------------------------------------------------ both
def test_both_is_the_union_and_records_every_rule():
    gen = torch.Generator().manual_seed(0)
    p_a, p_b = torch.rand(400, generator=gen), torch.rand(400, generator=gen)
    one, two, both = kept(p_a, p_b, S1), kept(p_a, p_b, S2), kept(p_a, p_b, BOTH)
    assert both.keys() == one.keys() | two.keys()
    assert one.keys() - two.keys() and two.keys() - one.keys() and one.keys() & two.keys()
    for i, (side, rules) in both.items():
        assert rules == tuple(r for r, rule_kept in ((1, one), (2, two)) if i in rule_kept)
        assert side == ("a" if p_a[i] > p_b[i] else "b")


def test_both_hand_cases():
    assert kept([0.9, 0.56, 0.95, 0.5], [0.1, 0.44, 0.6, 0.5], BOTH) == {
        0: ("a", (1, 2)),
        1: ("a", (1,)),
        2: ("a", (2,)),
    }


def test_unselected_indices_and_probabilities():
    result = select_pairs([0.9, 0.5, 0.2, 0.5], [0.1, 0.5, 0.8, 0.52])
    assert [s.index for s in result.selected] == [0, 2]
    assert result.unselected == [1, 3]
    sel = result.selected[1]
    assert (sel.chosen, sel.p_chosen, sel.p_rejected) == ("b", 0.8, 0.2)
    selected, unselected = result  # unpacks like a tuple
    assert len(selected) + len(unselected) == 4


def test_tensor_inputs_and_float32_rounding():
    # float32 cannot hold 0.55 exactly (it stores 0.5500000119); on the threshold it must still not count.
    p_a = torch.tensor([0.55, 0.9], dtype=torch.float32)
    p_b = torch.tensor([0.40, 0.1], dtype=torch.float32)
    assert kept(p_a, p_b, S1) == {1: ("a", (1,))}
    assert kept(torch.sigmoid(torch.tensor([3.0])), torch.sigmoid(torch.tensor([-3.0])), BOTH) == {0: ("a", (1, 2))}


def test_select_pairs_rejects_bad_input():
    with pytest.raises(ValueError, match="p_b has 1"):
        select_pairs([0.5, 0.5], [0.5])
    with pytest.raises(ValueError, match=r"p_a\[1\] = 1.5"):
        select_pairs([0.5, 1.5], [0.5, 0.5])
    with pytest.raises(ValueError, match="p_b"):
        select_pairs([0.5], [float("nan")])
    with pytest.raises(ValueError, match="one-dimensional"):
        select_pairs(torch.zeros(2, 2), torch.zeros(2, 2))


def test_empty_input():
    assert select_pairs([], []) == ([], [])


# ------------------------------------------------------------------ SERState
def test_pool_shrinks_by_exactly_the_selected_pairs():
    state = SERState(pool=list(range(10)))
    p_a = [0.9, 0.5, 0.5, 0.1, 0.5, 0.5, 0.7, 0.5, 0.5, 0.5]
    p_b = [0.1, 0.5, 0.5, 0.9, 0.5, 0.5, 0.2, 0.5, 0.5, 0.5]
    record = state.add_selected(select_pairs(p_a, p_b).selected, heldout_accuracy=0.6)
    assert state.pool == [1, 2, 4, 5, 7, 8, 9]
    assert [(lab.pair_id, lab.chosen, lab.loop) for lab in state.labels] == [(0, "a", 0), (3, "b", 0), (6, "a", 0)]
    assert record == LoopRecord(loop=0, selected=3, by_rule1=3, by_rule2=3, pool_left=7, labelled_total=3,
                                heldout_accuracy=0.6)
    assert state.loop == 1


def test_pair_ids_map_indices_of_a_scored_subset():
    state = SERState(pool=["p0", "p1", "p2", "p3"])
    scored = ["p3", "p1"]  # the loop scored only part of the pool, in its own order
    state.add_selected(select_pairs([0.9, 0.5], [0.1, 0.5]).selected, pair_ids=scored)
    assert state.pool == ["p0", "p1", "p2"]
    assert state.labels[0].pair_id == "p3"


def test_no_pair_is_labelled_twice_across_loops():
    gen = torch.Generator().manual_seed(0)
    ids = list(range(50))
    state = SERState(pool=ids)
    for loop in range(6):
        scored = list(state.pool)
        p_a, p_b = torch.rand(len(scored), generator=gen), torch.rand(len(scored), generator=gen)
        before = set(state.pool)
        record = state.add_selected(select_pairs(p_a, p_b).selected, heldout_accuracy=0.5 + loop / 100)
        assert before - set(state.pool) == {lab.pair_id for lab in state.labels if lab.loop == loop}
        assert len(before) - len(state.pool) == record.selected
    labelled = [lab.pair_id for lab in state.labels]
    assert len(labelled) == len(set(labelled))
    assert sorted(labelled + state.pool) == ids


def test_add_selected_rejects_bad_selections():
    state = SERState(pool=[0, 1, 2])
    first = select_pairs([0.9, 0.5, 0.5], [0.1, 0.5, 0.5]).selected
    state.add_selected(first)
    with pytest.raises(ValueError, match="not in the pool"):
        state.add_selected(first, pair_ids=[0, 1, 2])  # pair 0 was labelled in loop 0
    with pytest.raises(ValueError, match="outside"):
        state.add_selected([Selection(5, "a", (2,), 0.9, 0.1)])
    with pytest.raises(ValueError, match="twice"):
        state.add_selected([Selection(0, "a", (2,), 0.9, 0.1)] * 2)
    with pytest.raises(ValueError, match=r"\.selected"):
        state.add_selected(select_pairs([0.9], [0.1]))
    with pytest.raises(ValueError, match="finite"):
        state.add_selected([], heldout_accuracy=float("nan"))
    # A failed call leaves the state untouched.
    assert state.pool == [1, 2] and len(state.history) == 1


def test_state_rejects_duplicate_or_bad_ids():
    with pytest.raises(ValueError, match="twice"):
        SERState(pool=[1, 2, 1])
    with pytest.raises(ValueError, match="twice"):
        SERState(pool=[1, 2], labels=[PseudoLabel(2, "a", 0, (1,), 0.9, 0.1)])
    with pytest.raises(ValueError, match="ints or strings"):
        SERState(pool=[1.5])
    with pytest.raises(ValueError, match="chosen"):
        PseudoLabel(0, "c", 0, (1,), 0.9, 0.1)


def test_orient():
    label = PseudoLabel(0, "b", 0, (2,), 0.9, 0.1)
    assert label.orient("first", "second") == ("second", "first")


def test_round_trip_through_json(tmp_path):
    state = SERState(pool=[0, "x", 2, 3, 4])
    state.add_selected(select_pairs([0.9, 0.5, 0.2], [0.1, 0.5, 0.8]).selected, heldout_accuracy=0.61)
    state.add_selected([], heldout_accuracy=None)
    data = json.loads(json.dumps(state.to_dict()))
    again = SERState.from_dict(data)
    assert again == state
    state.save(tmp_path / "ser_state.json")
    assert SERState.load(tmp_path / "ser_state.json") == state
    # Resuming goes on where it stopped.
    assert again.loop == 2
    again.add_selected(select_pairs([0.9], [0.1]).selected, heldout_accuracy=0.7)
    assert again.labels[-1].loop == 2


def test_from_dict_rejects_malformed():
    with pytest.raises(ValueError, match="version"):
        SERState.from_dict({"pool": []})
    with pytest.raises(ValueError, match="malformed"):
        SERState.from_dict({"version": 1, "pool": [], "labels": [{"pair_id": 1}], "history": []})


# ------------------------------------------------------------------ stop rule
def history(accuracies, selected=None, pool_left=None):
    selected = selected or [5] * len(accuracies)
    pool_left = pool_left or [100] * len(accuracies)
    return [LoopRecord(i, s, s, 0, p, 0, a) for i, (a, s, p) in enumerate(zip(accuracies, selected, pool_left))]


def test_stop_rule_on_constructed_histories():
    assert not should_stop([])
    assert not should_stop(history([0.55]))
    assert not should_stop(history([0.55, 0.60, 0.62]))
    assert should_stop(history([0.55, 0.60, 0.60]))  # equal is not an improvement
    assert should_stop(history([0.55, 0.62, 0.60]))
    # patience 2: one bad loop is tolerated, two are not.
    assert not should_stop(history([0.55, 0.62, 0.60]), patience=2)
    assert not should_stop(history([0.55, 0.62, 0.60, 0.63]), patience=2)
    assert should_stop(history([0.55, 0.62, 0.60, 0.61]), patience=2)
    # min_delta: small gains do not count.
    assert should_stop(history([0.55, 0.60, 0.605]), min_delta=0.01)
    assert not should_stop(history([0.55, 0.60, 0.62]), min_delta=0.01)
    # Loops without an accuracy are skipped.
    assert not should_stop(history([0.55, None, 0.60]))


def test_stop_when_nothing_new_or_pool_empty():
    assert "selected no new pair" in stop_reason(history([0.5, 0.6], selected=[5, 0]))
    assert "pool is empty" in stop_reason(history([0.5, 0.6], pool_left=[10, 0]))
    state = SERState(pool=[0, 1])
    state.add_selected([], heldout_accuracy=0.5)
    assert state.should_stop() and "no new pair" in state.stop_reason()


def test_stop_rule_validation():
    with pytest.raises(ValueError, match="patience"):
        should_stop(history([0.5]), patience=0)
    with pytest.raises(ValueError, match="min_delta"):
        should_stop(history([0.5]), min_delta=-0.1)

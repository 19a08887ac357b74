"""engine.near_miss.near_field: the one rule of a near miss (polar's record readers, polar serve, polar's
command line and the engine's config suggest through it)."""
from engine.near_miss import near_field


def test_near_field_is_one_rule_of_a_near_miss_with_its_knobs():
    """records.misspelt (a hint) and polar serve's check_fields (a refusal) each called difflib under a
    rule of its own; near_field is the one, its knobs what they differ in."""
    fields = ("chosen", "rejected")
    assert near_field("chosn", fields, cutoff=0.75) == "chosen" and near_field("cand", fields, cutoff=0.75) is None
    assert near_field("ab", ("abc",), cutoff=0.8) == "abc" and near_field("ab", ("abc",), cutoff=0.85) is None
    # case: 'CHOSEN' shares no character with 'chosen' unless folded
    assert near_field("CHOSEN", fields, cutoff=0.8) is None
    assert near_field("CHOSEN", fields, cutoff=0.8, fold_case=True) == "chosen"
    # length: 'inputs_x' is close to 'input' (0.77) but 3 characters longer
    assert near_field("inputs_x", ("input",), cutoff=0.75) == "input"
    assert near_field("inputs_x", ("input",), cutoff=0.75, length_within=2) is None
    assert near_field("inputs_x", ("input", "inputs"), cutoff=0.75, length_within=2) == "inputs"
    assert near_field("input" * 10_000, ("input",), cutoff=0.1, length_within=2) is None

"""polar sample's repetition-loop truncation (polar/repetition.py)."""
import pytest

from polar.repetition import truncate_loop


def test_truncate_loop_refuses_a_single_copy_as_a_loop():
    with pytest.raises(ValueError, match="min_repeats must be at least 2, got 1"):
        truncate_loop("The quick brown fox jumps over the lazy dog near the riverbank.", 1)


def test_truncate_loop_rule():
    chunk = "the same sentence again. "
    base = "A normal start of a story."
    text, removed = truncate_loop(base + chunk * 5)
    assert text == base + chunk and removed == 4 * len(chunk)
    # a copy cut short by max_tokens belongs to the loop too
    assert truncate_loop(base + chunk * 5 + chunk[:9])[0] == base + chunk
    # a long run of one character
    assert truncate_loop("wait" + "!" * 50) == ("wait!", 49)
    # a text that is all loop, from its first character (the lower end of the search for the run's start)
    assert truncate_loop(chunk * 5) == (chunk, 4 * len(chunk))
    # short repetitions and ordinary text are left alone
    for t in ("ha ha ha ha", "Well...", "abc abc abc", "x = [1, 2, 3]\ny = 4\n", ""):
        assert truncate_loop(t) == (t, 0)
    # fewer than 4 copies is not a loop
    assert truncate_loop(base + chunk * 3) == (base + chunk * 3, 0)
    # a loop nested inside a loop: both go
    inner = "la" * 20
    assert truncate_loop("song: " + ("verse " + inner + " ") * 4)[0].startswith("song: verse la")

"""polar.launch: the --nproc option of polar score / polar eval."""
from __future__ import annotations

import pytest

from polar.launch import split_nproc


def test_nproc_in_both_spellings_and_the_rest_passed_on():
    assert split_nproc(["--nproc", "4", "--tp", "2"], 1) == (4, ["--tp", "2"])
    assert split_nproc(["--tp", "2", "--nproc=3"], 1) == (3, ["--tp", "2"])
    assert split_nproc(["--tp", "2"], 1) == (1, ["--tp", "2"])


@pytest.mark.parametrize("argv,error", [(["--tp", "2", "--nproc"], "expected a number of processes after it"),
                                        (["--nproc", "two"], "expected a number of processes, got 'two'"),
                                        (["--nproc=0"], "expected at least 1")])
def test_a_bad_nproc_is_named(argv, error):
    """A trailing --nproc was passed on to the entry point, which refused it as an unknown argument."""
    with pytest.raises(SystemExit, match=error):
        split_nproc(argv, 1)

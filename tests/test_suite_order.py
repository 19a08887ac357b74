"""tests/conftest.py's order: the longest files are handed to the pytest workers first."""
from __future__ import annotations

from pathlib import Path

from tests.conftest import SLOWEST_FIRST, _unit, pytest_collection_modifyitems

ROOT = Path(__file__).resolve().parents[1]


def test_the_slowest_first_order_names_files_that_exist():
    missing = [unit for unit in SLOWEST_FIRST if not (ROOT / unit).exists()]  # a renamed file falls to the end
    assert not missing, f"tests/conftest.py SLOWEST_FIRST names files that are gone: {missing}"


def test_the_kernels_folder_is_one_unit_and_other_files_are_their_own():
    assert _unit("tests/engine/kernels/test_reward_readout.py::in_interpreter_process") == "tests/engine/kernels/"
    assert _unit("tests/polar/test_plan.py::test_x[tp2]") == "tests/polar/test_plan.py"


def test_listed_files_come_first_in_their_order_and_each_files_tests_keep_theirs():
    class Item:
        def __init__(self, nodeid):
            self.nodeid = nodeid

    first, second = SLOWEST_FIRST[0], SLOWEST_FIRST[1]
    ids = ["tests/a_test.py::one", "tests/a_test.py::two", f"{second}::x", f"{second}::y",
           f"{first}::z", "tests/c_test.py::three"]
    items = [Item(i) for i in ids]
    pytest_collection_modifyitems(None, items)
    got = [i.nodeid for i in items]
    assert got[:3] == [f"{first}::z", f"{second}::x", f"{second}::y"]
    assert got[-3:] == ["tests/a_test.py::one", "tests/a_test.py::two", "tests/c_test.py::three"]

"""engine.pack_plan: the packer's plan, its errors (the plan itself is checked against a reference
collate in test_packing.py)."""
import numpy as np
import pytest

from engine.pack_plan import plan_sequences


def test_plan_errors():
    with pytest.raises(ValueError, match=r"group 1 has length 20.*data\.seq_length"):
        plan_sequences(np.array([3, 20]), 16)
    with pytest.raises(ValueError, match="data.packing='first_fit'"):
        plan_sequences(np.array([3]), 16, method="first_fit")
    with pytest.raises(TypeError, match="integer"):
        plan_sequences(np.array([3.0, 2.0]), 16)
    assert plan_sequences(np.zeros(0, dtype=np.int64), 16) == []
    assert [p.tolist() for p in plan_sequences([5, 9, 2, 8], 10, method="ordered")] == [[0], [1], [2, 3]]

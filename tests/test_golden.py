"""Recorded fixed-key answers (tests/golden.py) are reproduced bit for bit.

A refactoring changes structure, not answers: every array of every case must be identical
to the one recorded. Bit-identity holds on the machine kind that recorded the files (the
processor and the JAX build decide how XLA rounds); elsewhere the arrays must agree to
float32 round-off amplified by a short training, and the test says which comparison ran.
"""

import numpy as np
import pytest

import golden


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(golden.CASES))
def test_fixed_key_answers_are_unchanged(case):
    recorded = np.load(golden.DATA / f"golden_{case}.npz")
    arrays = golden.CASES[case]()
    names = set(recorded.files) - {"__machine__"}
    assert sorted(arrays) == sorted(names), "the case returns other arrays than were recorded"
    for name in sorted(names):
        golden.assert_reproduced(arrays[name], recorded[name], str(recorded["__machine__"]), rtol=1e-3, atol=1e-3,
                                 strict=True, err_msg=name)

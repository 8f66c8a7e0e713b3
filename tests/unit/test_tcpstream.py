"""The tcpstream byte pattern: any slice equals the same slice of the whole stream, so a
sender can produce it chunk by chunk and both ends hash the same bytes."""

import pytest

from testbed.measure.tcpstream import pattern


def test_pattern_words_count_up():
    assert pattern(0, 16) == (0).to_bytes(8, "big") + (1).to_bytes(8, "big")


@pytest.mark.parametrize("offset,n", [(0, 1), (3, 10), (8, 8), (13, 1000), (16383, 3)])
def test_pattern_slices_are_consistent(offset, n):
    whole = pattern(0, offset + n + 16)
    assert pattern(offset, n) == whole[offset:offset + n]
    assert len(pattern(offset, n)) == n

import pytest

from sdsengine.config import CalibrationConfig, SparseGPTConfig, SparsityPattern


@pytest.mark.parametrize("text,expected", [("0.5", (0.5, None)), ("2:4", (0.5, (2, 4))), ("4:8", (0.5, (4, 8))),
                                           ("1:4", (0.75, (1, 4)))])
def test_parse(text, expected):
    p = SparsityPattern.parse(text)
    assert (p.sparsity, p.nm) == expected and str(p) == text


@pytest.mark.parametrize("text,message", [("4:4", "0 < N < M"), ("5:4", "0 < N < M"), ("1.0", r"\[0, 1\)"),
                                          ("-0.1", r"\[0, 1\)"), ("half", "unknown sparsity pattern"),
                                          ("2:x", "two integers")])
def test_bad_patterns(text, message):
    with pytest.raises(ValueError, match=message):
        SparsityPattern.parse(text)


def test_blocksize_must_hold_groups():
    with pytest.raises(ValueError, match="multiple of M=8"):
        SparseGPTConfig(sparsity="4:8", blocksize=12)


def test_calibration_validation():
    with pytest.raises(ValueError):
        CalibrationConfig(nsamples=0)

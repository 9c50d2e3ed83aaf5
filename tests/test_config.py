import pytest
import torch

from sdsengine.config import CalibrationConfig, SparseGPTConfig, SparsityPattern, check_device


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


@pytest.mark.parametrize("device,gpus,message", [
    ("tpu", 0, "device must be cpu or cuda, got 'tpu'"),
    ("cuda", 0, "no CUDA GPU is visible here"),
    ("cuda:1", 1, r"1 CUDA GPU\(s\) visible here, cuda:0 to cuda:0"),
    ("cuda:x", 2, "cuda:0 to cuda:1"),
])
def test_devices_this_machine_lacks_are_named(device, gpus, message, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    with pytest.raises(ValueError, match=message):
        check_device(device)


def test_devices_this_machine_has_pass(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    for device in ("cpu", "cuda", "cuda:1"):
        check_device(device)
    SparseGPTConfig(sparsity="2:4", device="cuda:3")  # a config only describes; running it checks

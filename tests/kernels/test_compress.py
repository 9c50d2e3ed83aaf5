"""2:4 select-and-compress (kernels/compress.py) against reference.compress_24: values, metadata and the
decompressed weight exact, bit for bit (-0.0 written as 0)."""
import itertools

import pytest
import torch

from sdsengine.kernels import compress_24, decompress_24, use_backend

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SHAPES = ((1, 32), (3, 96), (17, 160), (64, 128), (2, 288))  # chunk tiles of 4: partial and several


def _bits(t):
    return t.view({4: torch.int32, 2: torch.int16}[t.element_size()])


def _check(both_backends, assert_exact, device, weight, scores=None):
    weight, scores = weight.to(device), None if scores is None else scores.to(device)
    (values, meta), (ref_values, ref_meta) = both_backends(lambda: compress_24(weight, scores))
    assert_exact(meta, ref_meta, "meta")
    assert_exact(_bits(values), _bits(ref_values), "value bits")
    dense, ref_dense = both_backends(lambda: decompress_24(ref_values, ref_meta))
    assert_exact(_bits(dense), _bits(ref_dense), "decompressed bits")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_reference(both_backends, assert_exact, device, dtype, shape):
    gen = torch.Generator().manual_seed(0)
    _check(both_backends, assert_exact, device, torch.randn(*shape, generator=gen).to(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_scores_pick_the_pair(both_backends, assert_exact, device, dtype):
    gen = torch.Generator().manual_seed(1)
    weight = torch.randn(5, 64, generator=gen).to(dtype)
    _check(both_backends, assert_exact, device, weight, torch.randn(5, 64, generator=gen).to(dtype))


@pytest.mark.parametrize("kind", ["all_equal", "signed_integers", "zeros"])
def test_ties_and_negative_zero(both_backends, assert_exact, device, kind):
    gen = torch.Generator().manual_seed(2)
    weight = {"all_equal": torch.full((3, 64), -1.5),
              "signed_integers": torch.randint(-1, 2, (3, 64), generator=gen).float(),
              "zeros": torch.zeros(3, 64)}[kind]
    weight[weight == 0] = -0.0
    _check(both_backends, assert_exact, device, weight.half())
    with use_backend("triton"):
        values, _ = compress_24(weight.half().to(device))
    assert not torch.signbit(values[values == 0]).any(), "-0.0 must be written as +0.0"


@pytest.mark.parametrize("dtype", DTYPES)
def test_nonfinite_weights(both_backends, assert_exact, device, dtype):
    """NaN (of either sign: its |.| must key like any NaN) ranks above inf, NaNs tie lower index first, as
    torch.sort ranks them; inf above every finite value."""
    weight = torch.randn(4, 64, generator=torch.Generator().manual_seed(5))
    nan = torch.tensor(float("nan"))
    weight[0, :8] = torch.tensor([nan, 1.0, -nan, 2.0, float("inf"), -nan, 3.0, float("-inf")])
    weight[1, :4] = torch.tensor([float("-inf"), -nan, 5.0, float("inf")])
    weight[2, :4] = -nan
    _check(both_backends, assert_exact, device, weight.to(dtype))


def test_negative_zero_scores_tie_with_positive_zero(both_backends, assert_exact, device):
    """Scores (not weights, whose |.| is +0.0) can be -0.0: it must tie with +0.0, lower index first, as in
    the reference (the kernel's sort key canonicalizes it)."""
    weight = torch.randn(2, 32, generator=torch.Generator().manual_seed(4))
    scores = torch.tensor([[1.0, -0.0, 0.0, -1.0] * 8, [-0.0, 0.0, -0.0, 0.0] * 8])
    _check(both_backends, assert_exact, device, weight, scores)


@pytest.mark.parametrize("dtype", DTYPES)
def test_every_combination_of_special_values(both_backends, assert_exact, device, dtype):
    """Every 4-combination (with repeats) of NaN of either sign, +-inf, +-0, 1 and -1 as a group of weights
    (ranked by magnitude), then as a group of scores: the kernel compares the floats themselves (NaN above all,
    NaNs and +-0 tied, lower index first) and must pick what the reference's sort picks."""
    nan = float("nan")
    special = [nan, -nan, float("inf"), float("-inf"), 0.0, -0.0, 1.0, -1.0]
    groups = torch.tensor(list(itertools.product(special, repeat=4))).reshape(512, 32).to(dtype)  # 8 a row
    _check(both_backends, assert_exact, device, groups)
    weight = torch.randn(groups.shape, generator=torch.Generator().manual_seed(6)).to(dtype)
    _check(both_backends, assert_exact, device, weight, groups)


def test_layout_by_hand(device):
    """Row 0 keeps columns {0, 2} of every group (nibble 0b1000); row 1 keeps {1, 3} (0b1101)."""
    row0 = torch.tensor([4.0, 1.0, -3.0, 2.0] * 8)
    row1 = torch.tensor([0.5, -6.0, 0.25, 7.0] * 8)
    with use_backend("triton"):
        values, meta = compress_24(torch.stack([row0, row1]).to(device))
    assert meta.tolist() == [[0x88888888 - 2 ** 32], [0xDDDDDDDD - 2 ** 32]]
    assert values[0, :4].tolist() == [4.0, -3.0, 4.0, -3.0] and values[1, :4].tolist() == [-6.0, 7.0, -6.0, 7.0]


def test_decompress_any_valid_meta(both_backends, assert_exact, device):
    """Metadata not made by compress: every ordered pair i0 < i1 in every nibble position."""
    gen = torch.Generator().manual_seed(3)
    pairs = torch.tensor([(a, b) for a in range(4) for b in range(a + 1, 4)])
    pick = pairs[torch.randint(0, len(pairs), (6, 4, 8), generator=gen)]
    nibbles = (pick[..., 0] | (pick[..., 1] << 2)).to(torch.int64) << torch.arange(0, 32, 4)
    meta = nibbles.sum(-1)
    meta = torch.where(meta >= 2 ** 31, meta - 2 ** 32, meta).to(torch.int32)
    values = torch.randn(6, 64, generator=gen).bfloat16()
    values[0, :4] = -0.0  # passes through as it is, like the reference's scatter
    values, meta = values.to(device), meta.to(device)
    dense, ref_dense = both_backends(lambda: decompress_24(values, meta))
    assert_exact(_bits(dense), _bits(ref_dense), "decompressed bits")


@pytest.mark.parametrize("shape", [(7, 64), (33, 96), (5, 320)])
def test_the_reference_path_in_blocks_of_rows_is_the_reference(monkeypatch, shape):
    """Where the references run (the CPU), compress and decompress go a block of rows at a time (their int64
    temporaries are some 13x a bf16 weight): blocks of one row, and of rows that do not divide the weight's, give the
    whole reference's values, metadata and weight bit for bit, with scores and without."""
    import sdsengine.kernels as kernels
    from sdsengine.kernels import reference
    gen = torch.Generator().manual_seed(5)
    weight, scores = torch.randn(*shape, generator=gen).bfloat16(), torch.rand(*shape, generator=gen)
    whole = [reference.compress_24(weight), reference.compress_24(weight, scores)]
    for block in (shape[1], 3 * shape[1]):  # one row; three rows
        monkeypatch.setattr(kernels, "_REFERENCE_BLOCK", block)
        with use_backend("torch"):
            for (values, meta), scored in zip(whole, (None, scores)):
                got_values, got_meta = compress_24(weight, scored)
                assert torch.equal(_bits(got_values), _bits(values)) and torch.equal(got_meta, meta)
                dense = decompress_24(values, meta)
                assert torch.equal(_bits(dense), _bits(reference.decompress_24(values, meta)))

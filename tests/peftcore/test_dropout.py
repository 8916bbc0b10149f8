"""Dropout drawn by position: the same distribution as a per-element Bernoulli mask."""

import math

import pytest
import torch

from peftcore.kernels.dropout import apply_drop, dropped_positions


@pytest.mark.parametrize("p", [0.05, 0.3, 0.9])
def test_the_drop_rate_is_p(p):
    torch.manual_seed(0)
    n = 1_000_000
    positions = dropped_positions(n, p)
    assert positions.dtype == torch.int64 and bool((positions[1:] > positions[:-1]).all())  # sorted, distinct
    assert int(positions[0]) >= 0 and int(positions[-1]) < n
    sigma = math.sqrt(n * p * (1 - p))
    assert abs(len(positions) - n * p) < 5 * sigma


def test_every_position_is_dropped_with_probability_p_independently():
    """Over many small masks: each index's drop frequency is p (the first and last included: an
    off-by-one in the gaps would never drop index 0 or always shift the run), and neighbours are
    independent (both dropped with probability p^2)."""
    torch.manual_seed(1)
    n, p, draws = 16, 0.25, 20_000
    masks = torch.zeros(draws, n)
    for i in range(draws):
        masks[i, dropped_positions(n, p)] = 1.0
    sigma = math.sqrt(p * (1 - p) / draws)
    assert (masks.mean(0) - p).abs().max() < 5 * sigma
    both = (masks[:, :-1] * masks[:, 1:]).mean(0)
    assert (both - p * p).abs().max() < 5 * math.sqrt(p * p * (1 - p * p) / draws)
    counts = masks.sum(1)  # the number dropped per mask is Binomial(n, p)
    assert abs(float(counts.var()) - n * p * (1 - p)) < 0.1 * n * p * (1 - p)


def test_a_long_run_past_the_first_chunk_and_the_edges():
    torch.manual_seed(2)
    assert len(dropped_positions(0, 0.5)) == 0
    assert len(dropped_positions(1, 0.5)) in (0, 1)
    rare = dropped_positions(10_000_000, 1e-5)  # few drops, long gaps
    assert abs(len(rare) - 100) < 5 * 10
    with pytest.raises(ValueError, match=r"in \(0, 1\), got 1.0"):
        dropped_positions(10, 1.0)


def test_apply_drop_zeroes_the_positions_and_scales_the_rest_in_row_major_order():
    x = torch.arange(1.0, 13.0).reshape(3, 4).t()  # not contiguous
    out = apply_drop(x, torch.tensor([0, 5]), 2.0)
    expected = 2.0 * x.contiguous().view(-1)
    expected[[0, 5]] = 0.0
    assert torch.equal(out.reshape(-1), expected) and torch.equal(
        x, torch.arange(1.0, 13.0).reshape(3, 4).t()
    )

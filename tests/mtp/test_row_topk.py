"""The fused draft loss's two-stage row top-k (skyrl_mtp.mtp.fused_loss._row_topk) against
torch.topk: same values, ids that point at them; plain torch (no Triton needed)."""

from __future__ import annotations

import pytest
import torch

from skyrl_mtp.mtp import fused_loss


@pytest.mark.parametrize("columns,k", [(151936, 64), (9997, 5), (1187 * 8, 64), (20, 5), (4096, 1)])
def test_row_topk_matches_torch_topk(columns: int, k: int) -> None:
    gen = torch.Generator().manual_seed(columns)
    # A strided view (row stride > columns), as the teacher's valid columns are.
    x = torch.randn(5, columns + 3, generator=gen)[:, :columns]
    values, ids = fused_loss._row_topk(x, k)
    expected, expected_ids = x.topk(k, dim=-1)
    torch.testing.assert_close(values.sort(-1).values, expected.sort(-1).values, rtol=0, atol=0)
    torch.testing.assert_close(x.gather(-1, ids), values, rtol=0, atol=0)
    # Continuous random values have no ties: the same ids.
    assert torch.equal(ids.sort(-1).values, expected_ids.sort(-1).values)


def test_segment_length_divides_and_bounds() -> None:
    assert fused_loss._segment_length(151936, 64) == 4748  # 151,936 = 32 x 4,748
    assert fused_loss._segment_length(20, 5) is None  # too short to split: one plain top-k
    for columns in (151936, 75968, 50653, 9997):
        segment = fused_loss._segment_length(columns, 64)
        if segment is not None:
            assert columns % segment == 0 and 256 <= segment <= 8192 and columns // segment >= 8

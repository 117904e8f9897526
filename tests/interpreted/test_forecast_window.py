"""The forecast window's Triton kernel (utils/forecast_window.py) against its PyTorch reference, on CPU tensors through
Triton's interpreter: each order count the kernel takes, windows of 1 to 6 steps (padded to a power of two), a
batch of 2, an element count that leaves the last program partly masked."""

import pytest
import torch

pytest.importorskip("triton", reason="Triton comes with the CUDA build of torch that requirements.txt installs")

from utils import forecast_window as F  # noqa: E402


@pytest.mark.parametrize("num_orders, window", [(1, 4), (2, 3), (3, 6), (3, 1)])
def test_the_window_kernel_matches_the_reference(num_orders, window):
    assert F.kernel_runs_on(torch.device("cpu"))
    torch.manual_seed(num_orders * 10 + window)
    slots, batch, tokens, dim = 5, 2, 7, 24  # 336 elements: six 64-wide programs, the last one partly masked
    orders = [torch.randn(slots, batch, tokens, dim, dtype=torch.bfloat16) for _ in range(num_orders)]
    coefficients = torch.randn(window, num_orders)
    gates = torch.randn(window, batch, slots, dim, dtype=torch.bfloat16)
    out = torch.full((window, batch, tokens, dim), float("nan"))
    got = F.window_contributions(orders, coefficients, gates, out=out)
    assert got.data_ptr() == out.data_ptr()
    torch.testing.assert_close(got, F.window_contributions_reference(orders, coefficients, gates),
                               rtol=1e-5, atol=1e-5)

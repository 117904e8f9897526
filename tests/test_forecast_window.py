"""The forecast window's definition (utils/forecast_window.py) against the per-step forecast it batches
(utils/caching.forecast_image_stream), in float64 with fresh random features: step j of the window is
img + contribution[j], whatever the image stream is. The kernel is checked against the reference through Triton's
interpreter in tests/interpreted/test_forecast_window.py and, compiled, at FLUX.1-dev's shapes on a CUDA GPU here."""

import pytest
import torch

from utils.caching import forecast_coefficients, forecast_image_stream
from utils.forecast_window import kernel_runs_on, window_contributions, window_contributions_reference


def test_each_window_step_is_the_per_step_forecast():
    g = torch.Generator().manual_seed(11)
    slots, batch, tokens, dim, window = 6, 2, 9, 8, 5
    orders = [torch.randn(slots, batch, tokens, dim, dtype=torch.float64, generator=g) for _ in range(3)]
    gate_weight = torch.randn(slots * dim, dim, dtype=torch.float64, generator=g)
    gate_bias = torch.randn(slots * dim, dtype=torch.float64, generator=g)
    tembs = torch.randn(window, batch, dim, dtype=torch.float64, generator=g)
    coefficients = torch.tensor([forecast_coefficients("hicache", d, 3, 0.6) for d in range(1, window + 1)],
                                dtype=torch.float64)
    gates = torch.nn.functional.linear(torch.nn.functional.silu(tembs), gate_weight, gate_bias)
    contributions = window_contributions_reference(orders, coefficients, gates.view(window, batch, slots, dim))
    assert contributions.shape == (window, batch, tokens, dim)
    for j in range(window):
        hidden = torch.randn(batch, tokens, dim, dtype=torch.float64, generator=g)  # any image stream
        expected = forecast_image_stream(hidden, tembs[j], coefficients[j], gate_weight, gate_bias, orders)
        torch.testing.assert_close(hidden + contributions[j], expected, rtol=1e-12, atol=1e-12)


def test_without_a_kernel_the_reference_fills_the_given_buffer():
    assert not kernel_runs_on(torch.device("meta"))
    orders = [torch.randn(3, 1, 4, 8) for _ in range(2)]
    coefficients, gates = torch.randn(2, 2), torch.randn(2, 1, 3, 8)
    out = torch.empty(2, 1, 4, 8)
    assert window_contributions(orders, coefficients, gates, out=out) is out
    torch.testing.assert_close(out, window_contributions_reference(orders, coefficients, gates), rtol=0, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the compiled kernel runs on a CUDA GPU (the interpreted "
                    "kernel is checked on CPU in tests/interpreted/test_forecast_window.py)")
@pytest.mark.parametrize("num_orders, window", [(3, 6), (2, 4)])
def test_the_compiled_kernel_at_flux_dev_shapes(num_orders, window):
    """FLUX.1-dev at 1024x1024: 57 cached slots (19 double + 38 single blocks), 4096 image tokens of 3072, bf16 orders
    and gates; the float64 reference on the same GPU."""
    device = torch.device("cuda")
    assert kernel_runs_on(device)
    g = torch.Generator(device).manual_seed(7 * num_orders + window)
    slots, batch, tokens, dim = 57, 1, 4096, 3072
    orders = [torch.randn(slots, batch, tokens, dim, dtype=torch.bfloat16, device=device, generator=g)
              for _ in range(num_orders)]
    coefficients = torch.randn(window, num_orders, device=device, generator=g)
    gates = torch.randn(window, batch, slots, dim, dtype=torch.bfloat16, device=device, generator=g)
    got = window_contributions(orders, coefficients, gates)
    expected = window_contributions_reference([o.double() for o in orders], coefficients.double(), gates.double())
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-4)

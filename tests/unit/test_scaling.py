"""The scaling fit (evaluation/scaling.py) on data whose law is known."""

import numpy as np
import pytest

from common.errors import BadInput
from evaluation.scaling import fit_power_law, render_png


@pytest.mark.parametrize("E, A, alpha", [(1.7, 2e5, 0.3), (2.5, 40.0, 0.12), (0.8, 3e8, 0.5)])
def test_the_fit_recovers_a_known_law_from_noisy_runs(E, A, alpha):
    rng = np.random.default_rng(0)
    compute = np.logspace(15, 19, 9)
    loss = E + A * compute**-alpha
    noisy = loss * (1 + rng.normal(0, 0.002, loss.size))
    fit = fit_power_law(compute, noisy)
    assert fit.alpha == pytest.approx(alpha, rel=0.08)
    assert fit.E == pytest.approx(E, rel=0.05)
    assert fit.rmse < 0.01 * loss.mean()
    assert fit(1e20) == pytest.approx(
        E + A * 1e20**-alpha, rel=0.02
    )  # an extrapolation a decade out


def test_an_exact_law_is_recovered_exactly():
    compute = np.logspace(16, 18, 5)
    fit = fit_power_law(compute, 2.0 + 100.0 * compute**-0.25)
    assert fit.alpha == pytest.approx(0.25, rel=1e-3) and fit.E == pytest.approx(2.0, rel=1e-3)
    assert "C^-0.2500" in fit.describe()


@pytest.mark.parametrize(
    "compute, loss, needle",
    [
        ([1e15, 1e16], [3.0, 2.9], "at least 3 runs"),
        ([1e15, 1e15, 1e15], [3.0, 2.9, 2.8], "3 different compute"),
        ([1e15, 0, 1e17], [3.0, 2.9, 2.8], "positive, finite compute"),
        ([1e15, 1e16, 1e17], [3.0, float("nan"), 2.8], "finite losses"),
        ([1e15, 1e16], [3.0, 2.9, 2.8], "as many losses"),
    ],
)
def test_what_cannot_be_fitted_is_one_clear_error(compute, loss, needle):
    with pytest.raises(BadInput, match=needle):
        fit_power_law(compute, loss)


def test_the_plot_is_a_png():
    compute = np.logspace(15, 18, 4)
    loss = 2 + 50 * compute**-0.2
    png = render_png(compute, loss, fit_power_law(compute, loss), labels=["a", "b", "c", "d"])
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000

"""Loss against compute: the fit of a scaling-law study's first step, L(C) = E + A * C^-alpha (an irreducible
loss E, and a power law in the compute C above it, as in Kaplan et al. and Chinchilla's approach 3 in one
variable), its plot with the residuals, and the fitted exponent.

The fit is least squares on L itself: for a given E the rest is a straight line in log(L - E) against log C
(solved exactly), so E alone is searched, on a grid below the smallest loss and then by golden section; no
optimiser that needs a starting guess, and the same answer every time.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np

from common.errors import BadInput


@dataclass(frozen=True)
class PowerLaw:
    E: float  # the irreducible loss
    A: float
    alpha: float  # the exponent: each 10x of compute divides the reducible loss by 10^alpha
    rmse: float  # of the fit, in loss

    def __call__(self, compute: np.ndarray | float) -> np.ndarray | float:
        return self.E + self.A * np.power(compute, -self.alpha)

    def describe(self) -> str:
        return (
            f"L(C) = {self.E:.4f} + {self.A:.4g} * C^-{self.alpha:.4f} (rmse {self.rmse:.4f}; "
            f"10x compute takes {1 - 10**-self.alpha:.1%} off the loss above {self.E:.3f})"
        )


def _line(logc: np.ndarray, loss: np.ndarray, E: float) -> tuple[float, float, float]:
    """For irreducible loss E: (A, alpha, squared error in loss) of the best line in log space."""
    y = np.log(loss - E)
    slope, intercept = np.polyfit(logc, y, 1)
    pred = E + np.exp(intercept + slope * logc)
    return float(np.exp(intercept)), float(-slope), float(np.sum((pred - loss) ** 2))


def fit_power_law(compute: list[float] | np.ndarray, loss: list[float] | np.ndarray) -> PowerLaw:
    c, loss_ = np.asarray(compute, dtype=float), np.asarray(loss, dtype=float)
    if c.shape != loss_.shape or c.ndim != 1:
        raise BadInput("a scaling fit needs as many losses as compute figures")
    if c.size < 3:
        raise BadInput(f"a scaling fit needs at least 3 runs (E, A and alpha), got {c.size}")
    if not (np.all(np.isfinite(c)) and np.all(np.isfinite(loss_))) or np.any(c <= 0):
        raise BadInput("a scaling fit needs positive, finite compute and finite losses")
    if np.unique(c).size < 3:
        raise BadInput("a scaling fit needs at least 3 different compute figures")
    logc, top = np.log(c), float(loss_.min())
    eps = 1e-9 * max(1.0, abs(top))
    grid = top - eps - (top - eps) * (1 - np.linspace(0, 1, 200) ** 0.5) if top > 0 else None
    if grid is None:
        raise BadInput("a scaling fit needs positive losses")
    errs = [_line(logc, loss_, E)[2] for E in grid]
    k = int(np.argmin(errs))
    lo, hi = grid[max(k - 1, 0)], grid[min(k + 1, len(grid) - 1)]
    phi = (math.sqrt(5) - 1) / 2
    a, b = lo, hi
    for _ in range(80):  # golden section on E between the grid's neighbours of the best point
        x1, x2 = b - phi * (b - a), a + phi * (b - a)
        if _line(logc, loss_, x1)[2] < _line(logc, loss_, x2)[2]:
            b = x2
        else:
            a = x1
    E = (a + b) / 2
    A, alpha, sq = _line(logc, loss_, E)
    return PowerLaw(E, A, alpha, math.sqrt(sq / c.size))


def render_png(compute, loss, fit: PowerLaw, labels: list[str] | None = None) -> bytes:
    """Loss against compute (log x) with the fit above, and the residuals below."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c, loss_ = np.asarray(compute, dtype=float), np.asarray(loss, dtype=float)
    fig, (top, bottom) = plt.subplots(
        2, 1, figsize=(7, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1]}
    )
    xs = np.logspace(np.log10(c.min()) - 0.2, np.log10(c.max()) + 0.5, 200)
    top.scatter(c, loss_, color="C0", zorder=3, label="runs")
    for x, y, name in zip(c, loss_, labels or []):
        top.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    top.plot(xs, fit(xs), color="C1", label=fit.describe().split(" (")[0])
    top.axhline(fit.E, color="C1", ls=":", lw=1, label=f"irreducible {fit.E:.3f}")
    top.set_xscale("log")
    top.set_ylabel("val loss")
    top.set_title(f"loss against compute: alpha = {fit.alpha:.3f}")
    top.legend(fontsize=8)
    bottom.scatter(c, loss_ - fit(c), color="C0")
    bottom.axhline(0, color="gray", lw=1)
    bottom.set_xlabel("training compute (FLOPs)")
    bottom.set_ylabel("residual")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()

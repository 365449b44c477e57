"""Bits per dimension from a log-likelihood in nats per image, and the note that says how.

The one formula behind every bits/dim figure: the training metrics, the card and POST /log-likelihood.
"""

from __future__ import annotations

import math

# A density on [0, 1] data is read as this many levels per pixel (8-bit images), each a bin of width 1/256.
DISCRETE_BINS = 256
_LN2 = math.log(2.0)

DENSITY_NOTE = (f"density on [0, 1] data read as {DISCRETE_BINS} levels per pixel: "
                f"(-log p(x) + D log {DISCRETE_BINS}) / (D ln 2)")
MASS_NOTE = "binary data, a probability mass: -log p(x) / (D ln 2)"


def bits_per_dim_note(likelihood: str, binary: bool) -> str | None:
    """How bits/dim are computed for a model of `likelihood` on data that is `binary` or not; None when
    they would mean nothing (a Bernoulli likelihood of non-binary data is no probability)."""
    if likelihood == "gaussian":
        return DENSITY_NOTE
    return MASS_NOTE if binary else None


def bits_per_dim(log_px: float, data_dim: int, likelihood: str, binary: bool) -> float | None:
    """Bits per dimension of `log_px` nats per image (see `bits_per_dim_note`); None when meaningless.

    For a density on [0, 1]^D, log P(bin) ~= log p(x) - D log 256; a probability mass needs no bins.
    """
    if likelihood == "gaussian":
        return -(log_px - data_dim * math.log(DISCRETE_BINS)) / (data_dim * _LN2)
    return -log_px / (data_dim * _LN2) if binary else None

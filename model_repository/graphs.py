"""The graphs of a model folder (`models/README.md`, "Graphs"): each role's input and output names.

The exporter writes exactly these names and the service checks and feeds them; neither spells a name
itself.
"""

from __future__ import annotations

from dataclasses import dataclass

# Input names: images (float32 [N, D]), latent codes ([N, d]) and the bound's noise ([N, S, d]).
X, Z, EPS = "x", "z", "eps"
# The flow parameters an encoder of a flow model outputs (u_hat, w [N, K, d], b [N, K]).
FLOW_PARAMS = ("flow_u", "flow_w", "flow_b")
# The encoder's mean pushed through the K flows [N, d]; optional: older encoders lack it, and the
# service then computes it from FLOW_PARAMS (service/numerics.py planar_flow).
FLOWED_MEAN = "z_k"


@dataclass(frozen=True)
class GraphIO:
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]  # the outputs every graph of this role has (kind-specific ones below)


GRAPHS = {
    "encoder": GraphIO((X,), ("mean", "log_var")),
    "decoder": GraphIO((Z,), ("x_mean",)),
    "bound": GraphIO((X, EPS), ("log_w",)),  # vae, flow-vae: log importance weights [N, S]
    "loglik": GraphIO((X,), ("log_px",)),  # ppca: the exact log-likelihood [N]
}
# The graphs each kind must have.
REQUIRED_GRAPHS = {
    "ppca": ("encoder", "decoder", "loglik"),
    "vae": ("encoder", "decoder", "bound"),
    "flow-vae": ("encoder", "decoder", "bound"),
}
# The decoder's second output by likelihood: Bernoulli logits, or a Gaussian's log-variance per pixel.
DECODER_EXTRA = {"bernoulli": "logits", "gaussian": "x_log_var"}


def encoder_outputs(flows: bool) -> list[str]:
    """The outputs an encoder exports: mean and log_var, and for flow models the flow parameters and z_k."""
    return [*GRAPHS["encoder"].outputs, *((*FLOW_PARAMS, FLOWED_MEAN) if flows else ())]


def decoder_outputs(likelihood: str) -> list[str]:
    return [*GRAPHS["decoder"].outputs, DECODER_EXTRA[likelihood]]

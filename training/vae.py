"""Variational autoencoder (Kingma & Welling, 2014) with optional planar flows on the posterior
(Rezende & Mohamed, 2015): one :class:`VAE` covers ``vae`` (K = 0 flows) and ``flow-vae`` (K > 0).

    q(z_K | x): z_0 = mean(x) + exp(log_var(x) / 2) * eps, eps ~ N(0, I); z_K = f_K o ... o f_1(z_0)
    log w = log p(x | z_K) + log p(z_K) - log q_0(z_0 | x) + sum_k log|det J_k|

Every quantity is per sample ([N] or [N, S]); reductions happen only in the training loop. The ELBO is
the mean of log w over samples, the importance-weighted bound (Burda et al., 2016) is
logsumexp_S(log w) - log S; all constants are kept, so figures are nats per image.

Export: ``export_modules(model) -> {role: (module, input_names, output_names)}`` gives the three
graphs of ``models/README.md`` (``encoder``, ``decoder``, ``bound``) as traceable ``nn.Module`` s;
``training/export.py`` calls it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.functional import softplus

from model_repository.card import FLOW_TYPES, LIKELIHOODS
from model_repository.graphs import GRAPHS, decoder_outputs, encoder_outputs
from training.flows import GlobalPlanarFlows, fused_planar_flows, planar_flows, u_hat
from training.layers import GatedLinear, ResidualLinear

LOG_2PI = math.log(2.0 * math.pi)
ACTIVATIONS = {"relu": nn.ReLU, "elu": nn.ELU, "tanh": nn.Tanh, "gelu": nn.GELU, "none": nn.Identity}
LAYERS = ("plain", "residual", "gated")


@dataclass
class VAEConfig:
    data_dim: int
    latent_dim: int = 40  # the issue's benchmark latent size (as the peers' models)
    encoder_hidden: tuple[int, ...] = (512, 512)  # two 512-unit layers beat the peers' one on mnist5k-bin
    decoder_hidden: tuple[int, ...] = (512, 512)  # mirror of the encoder
    activation: str = "tanh"  # overfits less than relu on mnist5k-bin (docs/benchmarks.md, VAE quality)
    likelihood: str = "bernoulli"  # binary images; 'gaussian' for continuous data
    var_floor: float = 1e-3  # gaussian only: var = exp(raw) + floor bounds the density on flat [0, 1] pixels
    flows: int = 0  # K planar flows; 0 = plain VAE
    flow_type: str = "amortized"  # per-sample flow parameters from the encoder (the paper's choice)
    layer: str = "plain"  # hidden layers of encoder and decoder (see mlp); checkpoints without it are plain

    def __post_init__(self):
        # checkpoints store lists (JSON-friendly); keep tuples inside.
        self.encoder_hidden = tuple(int(h) for h in self.encoder_hidden)
        self.decoder_hidden = tuple(int(h) for h in self.decoder_hidden)
        if self.likelihood not in LIKELIHOODS:
            raise ValueError(f"likelihood must be one of {LIKELIHOODS}, got {self.likelihood!r}")
        if self.flow_type not in FLOW_TYPES:
            raise ValueError(f"flow_type must be one of {FLOW_TYPES}, got {self.flow_type!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {tuple(ACTIVATIONS)}, got {self.activation!r}")
        if self.layer not in LAYERS:
            raise ValueError(f"layer must be one of {LAYERS}, got {self.layer!r}")
        if self.flows < 0 or self.latent_dim < 1 or self.data_dim < 1:
            raise ValueError(f"need flows >= 0, latent_dim >= 1, data_dim >= 1; got flows={self.flows}, "
                             f"latent_dim={self.latent_dim}, data_dim={self.data_dim}")
        if self.var_floor <= 0:
            raise ValueError(f"var_floor must be > 0, got {self.var_floor}")


def mlp(sizes: list[int], activation: str, layer: str = "plain") -> nn.Sequential:
    """Linear layers of the given sizes with `activation` after every one but the last.

    layer "plain": Linear then activation (the flat Sequential of old checkpoints: their state_dict keys).
    "residual": a hidden layer whose width equals its input's is h + act(Linear(h)) (the first layer and
    size changes stay plain). "gated": each hidden layer is act(Linear(h)) * sigmoid(Linear_g(h)), the gated
    linear units of Tomczak & Welling's VampPrior code (GatedDense; their activation is none: --activation
    none). The last layer is a plain Linear in every case.
    """
    if layer == "plain":
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
            layers.append(nn.Linear(a, b))
            if i < len(sizes) - 2:
                layers.append(ACTIVATIONS[activation]())
        return nn.Sequential(*layers)
    blocks: list[nn.Module] = []
    for a, b in zip(sizes[:-2], sizes[1:-1], strict=True):
        if layer == "gated":
            blocks.append(GatedLinear(a, b, ACTIVATIONS[activation]()))
        elif a == b:
            blocks.append(ResidualLinear(b, ACTIVATIONS[activation]()))
        else:
            blocks.append(nn.Sequential(nn.Linear(a, b), ACTIVATIONS[activation]()))
    return nn.Sequential(*blocks, nn.Linear(sizes[-2], sizes[-1]))


class VAE(nn.Module):
    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = c = config
        D, d, K = c.data_dim, c.latent_dim, c.flows
        self.amortized = K > 0 and c.flow_type == "amortized"
        # One output layer for mean, log_var and (amortized) raw flow parameters u, w [K, d], b [K].
        n_out = 2 * d + (K * (2 * d + 1) if self.amortized else 0)
        self.encoder = mlp([D, *c.encoder_hidden, n_out], c.activation, c.layer)
        self.decoder = mlp([d, *c.decoder_hidden, D * (2 if c.likelihood == "gaussian" else 1)], c.activation,
                           c.layer)
        self.global_flows = GlobalPlanarFlows(d, K) if K > 0 and c.flow_type == "global" else None
        # Training may run the encoder's and decoder's matrix products in a lower precision (`fit --precision
        # bf16`): a setting of the fit, not of the model, so not in the config. Only in training mode.
        self.mlp_dtype: torch.dtype | None = None

    def _mlp(self, net: nn.Sequential, x: Tensor) -> Tensor:
        """net(x), under autocast to `mlp_dtype` when training with one. The output is cast back to float32, so
        everything after the two networks (reparametrization, flows, densities, the sums over pixels) stays
        float32: only the hidden layers' products and activations lose precision."""
        if self.mlp_dtype is None or not self.training:
            return net(x)
        with torch.autocast(x.device.type, dtype=self.mlp_dtype):
            out = net(x)
        return out.float()

    # -- checks ---------------------------------------------------------------------------------

    def _check_x(self, x: Tensor) -> None:
        if x.dim() != 2 or x.shape[1] != self.config.data_dim:
            raise ValueError(f"expected x of shape [N, {self.config.data_dim}], got {tuple(x.shape)}")

    def _check_z(self, z: Tensor) -> None:
        if z.dim() < 1 or z.shape[-1] != self.config.latent_dim:
            raise ValueError(f"expected z of shape [..., {self.config.latent_dim}], got {tuple(z.shape)}")

    # -- encoder / decoder ----------------------------------------------------------------------

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor, tuple[Tensor, Tensor, Tensor] | None]:
        """x [N, D] -> mean [N, d], log_var [N, d], flow parameters (u_hat, w, b) or None.

        Amortized flows give u_hat, w [N, K, d], b [N, K] (u_hat constrained: w^T u_hat >= -1); global
        flows give their shared u_hat, w [K, d], b [K]; None without flows.
        """
        self._check_x(x)
        return self._encode(x)

    def _encode(self, x: Tensor, raw_u: bool = False):
        """As encode; with raw_u, amortized flows give the encoder's raw u rather than u_hat."""
        d, K = self.config.latent_dim, self.config.flows
        h = self._mlp(self.encoder, x)
        if self.amortized:
            # one split (one autograd node) rather than five slices
            mean, log_var, u, w, b = h.split([d, d, K * d, K * d, K], dim=1)
            u, w = u.reshape(-1, K, d), w.reshape(-1, K, d)
            return mean, log_var, (u if raw_u else u_hat(u, w), w, b)
        mean, log_var = h.split([d, d], dim=1)
        if self.global_flows is not None:
            gf = self.global_flows
            return mean, log_var, ((gf.u, gf.w, gf.b) if raw_u else gf.params())
        return mean, log_var, None

    def decode(self, z: Tensor) -> tuple[Tensor, Tensor | None]:
        """z [..., d] -> (logits [..., D], None) for bernoulli, (mean, log_var) [..., D] each for gaussian."""
        self._check_z(z)
        return self._decode(z)

    def _decode(self, z: Tensor):
        out = self._mlp(self.decoder, z)
        if self.config.likelihood == "bernoulli":
            return out, None
        D = self.config.data_dim
        mean, raw = out[..., :D], out[..., D:]
        # var = exp(raw) + var_floor, in log space: log_var = raw + log(1 + var_floor exp(-raw)).
        return mean, raw + softplus(math.log(self.config.var_floor) - raw)

    def flow(self, z0: Tensor, params) -> tuple[Tensor, Tensor]:
        """Apply the flows to z0 [N, S, d] with encode()'s parameters -> (z_K [N, S, d], log_det [N, S])."""
        if params is None:
            return z0, torch.zeros(z0.shape[:-1], dtype=z0.dtype, device=z0.device)
        uh, w, b = params
        if self.amortized:  # [N, K, d] -> [N, 1, K, d]: the same flow for all S samples of a row
            uh, w, b = uh.unsqueeze(1), w.unsqueeze(1), b.unsqueeze(1)
        return planar_flows(z0, uh, w, b)

    def _fused_flow(self, z0: Tensor, params) -> tuple[Tensor, Tensor]:
        """flow() from raw parameters (u, not u_hat) by :func:`fused_planar_flows`, for training."""
        if self.amortized:
            return fused_planar_flows(z0, *params)
        u, w, b = params  # global [K, d]: one row of parameters for all N * S samples
        zK, log_det = fused_planar_flows(z0.reshape(1, -1, z0.shape[-1]), u[None], w[None], b[None])
        return zK.view(z0.shape), log_det.view(z0.shape[:-1])

    # -- bounds ---------------------------------------------------------------------------------

    def log_px_z(self, x: Tensor, zK: Tensor) -> Tensor:
        """log p(x | z_K): x [N, D], z_K [N, S, d] -> [N, S]."""
        a, log_var = self._decode(zK)
        x = x.unsqueeze(1)
        if self.config.likelihood == "bernoulli":  # x log sigmoid(a) + (1 - x) log sigmoid(-a)
            return (x * a - softplus(a)).sum(-1)
        return -0.5 * ((x - a).pow(2) * torch.exp(-log_var) + log_var + LOG_2PI).sum(-1)

    def log_weight_terms(self, x: Tensor, eps: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(log p(x|z_K), log p(z_K), log q_0(z_0|x), sum_k log|det J_k|), each [N, S], for eps [N, S, d]."""
        self._check_x(x)
        if eps.dim() != 3 or eps.shape[0] != x.shape[0] or eps.shape[2] != self.config.latent_dim:
            raise ValueError(f"expected eps of shape [{x.shape[0]}, S, {self.config.latent_dim}], "
                             f"got {tuple(eps.shape)}")
        return self._terms(x, eps)

    def _terms(self, x: Tensor, eps: Tensor):
        # training: u_hat and the flows in one hand-written autograd Function (fewer operator calls)
        fused = self.config.flows > 0 and self.training and torch.is_grad_enabled()
        mean, log_var, params = self._encode(x, raw_u=fused)
        z0 = mean.unsqueeze(1) + torch.exp(0.5 * log_var).unsqueeze(1) * eps
        zK, log_det = self._fused_flow(z0, params) if fused else self.flow(z0, params)
        log_pz = -0.5 * (zK.pow(2) + LOG_2PI).sum(-1)
        # z_0 - mean = std * eps exactly, so log N(z_0; mean, var) = sum -(eps^2 + log_var + log 2 pi) / 2.
        log_q0 = -0.5 * (eps.pow(2) + log_var.unsqueeze(1) + LOG_2PI).sum(-1)
        return self.log_px_z(x, zK), log_pz, log_q0, log_det

    def log_weights(self, x: Tensor, eps: Tensor) -> Tensor:
        """log w [N, S] = log p(x|z_K) + log p(z_K) - log q_0(z_0|x) + sum log|det J| (the bound.onnx graph)."""
        log_px_z, log_pz, log_q0, log_det = self.log_weight_terms(x, eps)
        return log_px_z + log_pz - log_q0 + log_det

    def _log_weights(self, x: Tensor, eps: Tensor) -> Tensor:
        log_px_z, log_pz, log_q0, log_det = self._terms(x, eps)
        return log_px_z + log_pz - log_q0 + log_det

    def _eps(self, n: int, S: int, x: Tensor, generator: torch.Generator | None) -> Tensor:
        return torch.randn((n, S, self.config.latent_dim), generator=generator, device=x.device, dtype=x.dtype)

    def elbo(self, x: Tensor, S: int = 1, generator: torch.Generator | None = None) -> Tensor:
        """Monte Carlo ELBO per row [N]: the mean of log w over S samples."""
        self._check_x(x)
        if S < 1:
            raise ValueError(f"S must be >= 1, got {S}")
        return self.log_weights(x, self._eps(len(x), S, x, generator)).mean(1)

    def importance_weighted_bound(self, x: Tensor, S: int, chunk: int = 50_000,
                                  generator: torch.Generator | None = None) -> Tensor:
        """log (1/S) sum_s w_s per row [N] (a lower bound on log p(x) that tightens as S grows).

        Computed in pieces of at most ``chunk`` (row, sample) pairs, so S = 5000 fits in memory.
        """
        self._check_x(x)
        if S < 1 or chunk < 1:
            raise ValueError(f"S and chunk must be >= 1, got S={S}, chunk={chunk}")
        rows = max(1, chunk // S)
        s_piece = max(1, chunk // rows)
        out = []
        for i in range(0, len(x), rows):
            xb = x[i : i + rows]
            log_w = torch.cat([self._log_weights(xb, self._eps(len(xb), min(s_piece, S - j), x, generator))
                               for j in range(0, S, s_piece)], dim=1)
            out.append(torch.logsumexp(log_w, dim=1) - math.log(S))
        return torch.cat(out)

    # -- generation -----------------------------------------------------------------------------

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """n images' means E[x | z], z ~ N(0, I) -> [n, D] (probabilities for bernoulli)."""
        p = next(self.parameters())
        z = torch.randn((n, self.config.latent_dim), generator=generator, device=p.device, dtype=p.dtype)
        return self.x_mean(z)

    def x_mean(self, z: Tensor) -> Tensor:
        a, _ = self.decode(z)
        return torch.sigmoid(a) if self.config.likelihood == "bernoulli" else a

    def reconstruct(self, x: Tensor) -> Tensor:
        """E[x | z_K] at z_0 = the posterior mean pushed through the flows -> [N, D]."""
        mean, _, params = self.encode(x)
        zK, _ = self.flow(mean.unsqueeze(1), params)
        return self.x_mean(zK[:, 0])


# ------------------------------------------------------------------------------------------------
# Export wrappers: exactly the named outputs of models/README.md, traceable (no data-dependent control).
# ------------------------------------------------------------------------------------------------


class EncoderGraph(nn.Module):
    """x -> mean, log_var[, flow_u (u_hat), flow_w, flow_b, z_k]; global flows broadcast to [N, K, d].

    z_k, the mean pushed through the K flows, is computed in the graph: a server then needs no flow of its own.
    """

    def __init__(self, vae: VAE):
        super().__init__()
        self.vae = vae

    def forward(self, x: Tensor):
        mean, log_var, params = self.vae._encode(x)
        if params is None:
            return mean, log_var
        uh, w, b = params
        if not self.vae.amortized:
            n = x.shape[0]
            # views of the nn.Parameters w, b would keep requires_grad even under no_grad; these graphs
            # are for inference, so hand out detached views
            uh, w, b = uh.expand(n, -1, -1), w.detach().expand(n, -1, -1), b.detach().expand(n, -1)
        z_k, _ = planar_flows(mean, uh, w, b)
        return mean, log_var, uh, w, b, z_k


class DecoderGraph(nn.Module):
    """z -> x_mean, logits (bernoulli) or x_mean, x_log_var (gaussian)."""

    def __init__(self, vae: VAE):
        super().__init__()
        self.vae = vae

    def forward(self, z: Tensor):
        a, log_var = self.vae._decode(z)
        if self.vae.config.likelihood == "bernoulli":
            return torch.sigmoid(a), a
        return a, log_var


class BoundGraph(nn.Module):
    """x [N, D], eps [N, S, d] -> log_w [N, S]."""

    def __init__(self, vae: VAE):
        super().__init__()
        self.vae = vae

    def forward(self, x: Tensor, eps: Tensor) -> Tensor:
        return self.vae._log_weights(x, eps)


def export_modules(model: VAE) -> dict[str, tuple[nn.Module, list[str], list[str]]]:
    """role -> (module, input names, output names) for the encoder, decoder and bound graphs, named as the
    contract names them (model_repository/graphs.py)."""
    outputs = {"encoder": encoder_outputs(model.config.flows > 0),
               "decoder": decoder_outputs(model.config.likelihood), "bound": list(GRAPHS["bound"].outputs)}
    modules = {"encoder": EncoderGraph(model), "decoder": DecoderGraph(model), "bound": BoundGraph(model)}
    return {role: (module.eval(), list(GRAPHS[role].inputs), outputs[role]) for role, module in modules.items()}

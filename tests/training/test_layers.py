"""`--layer`: the encoder's and decoder's hidden layers (training/vae.py's mlp, training/layers.py) against
the same computation written out from their weights."""

import pytest
import torch
from torch import nn

from training.layers import GatedLinear, ResidualLinear
from training.vae import VAE, VAEConfig, mlp


def _dense(layer: nn.Linear, h: torch.Tensor) -> torch.Tensor:
    return h @ layer.weight.T + layer.bias


def test_plain_layers_keep_the_flat_sequential_of_old_checkpoints():
    net = mlp([6, 5, 5, 2], "tanh")
    assert list(net.state_dict()) == ["0.weight", "0.bias", "2.weight", "2.bias", "4.weight", "4.bias"]
    assert [type(m) for m in net] == [nn.Linear, nn.Tanh, nn.Linear, nn.Tanh, nn.Linear]


def test_residual_layers_add_a_skip_where_the_width_stays():
    torch.manual_seed(0)
    net = mlp([6, 5, 5, 4, 2], "tanh", "residual").double()
    first, second, third, last = net
    assert isinstance(second, ResidualLinear) and not isinstance(first, ResidualLinear)  # 6 -> 5 stays plain
    assert not isinstance(third, ResidualLinear) and isinstance(last, nn.Linear)  # 5 -> 4 as well
    x = torch.randn(7, 6, dtype=torch.float64)
    h1 = torch.tanh(_dense(first[0], x))
    h2 = h1 + torch.tanh(_dense(second.linear, h1))
    h3 = torch.tanh(_dense(third[0], h2))
    torch.testing.assert_close(net(x), _dense(last, h3), rtol=0, atol=1e-12)


@pytest.mark.parametrize("activation", ["tanh", "none"])
def test_gated_layers_are_gated_linear_units(activation):
    torch.manual_seed(1)
    net = mlp([6, 5, 3], activation, "gated").double()
    gated, last = net
    assert isinstance(gated, GatedLinear)
    x = torch.randn(4, 6, dtype=torch.float64)
    a = _dense(gated.linear, x)
    h = (torch.tanh(a) if activation == "tanh" else a) * torch.sigmoid(_dense(gated.gate, x))
    torch.testing.assert_close(net(x), _dense(last, h), rtol=0, atol=1e-12)


def test_layer_is_part_of_the_model_config():
    cfg = VAEConfig(data_dim=6, latent_dim=2, encoder_hidden=(4, 4), decoder_hidden=(4, 4), layer="gated")
    assert isinstance(VAE(cfg).encoder[0], GatedLinear) and isinstance(VAE(cfg).decoder[1], GatedLinear)
    with pytest.raises(ValueError, match="layer must be one of"):
        VAEConfig(data_dim=6, layer="dense")

"""The regression network of the MAML paper: two hidden ReLU layers of 40 units."""

from __future__ import annotations

from torch import nn


class MLP(nn.Module):
    def __init__(self, in_features: int = 1, out_features: int = 1, hidden=(40, 40)):
        super().__init__()
        widths = [in_features, *hidden]
        layers = []
        for a, b in zip(widths[:-1], widths[1:]):
            layers += [nn.Linear(a, b), nn.ReLU()]
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(widths[-1], out_features)

    def forward(self, x):
        return self.head(self.features(x))


def mlp(in_features: int = 1, out_features: int = 1, hidden=(40, 40)) -> MLP:
    """Build a ReLU MLP; the default is the sinusoid network of Finn et al. (2017)."""
    return MLP(in_features, out_features, tuple(hidden))

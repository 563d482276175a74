"""Bits/dim convention: a uniform density scores log2(levels); a histogram model's bpd is its entropy."""

import math

import torch

from genkit.data.images import load_images
from genkit.eval.bpd import bits_per_dim


def test_uniform_model_scores_log2_levels():
    d = load_images("digits", "test")
    dims = 64
    uniform = lambda v, y: torch.full((v.shape[0],), -dims * math.log(2.0))  # density 2^-D on [-1,1]^D
    assert abs(bits_per_dim(uniform, d) - math.log2(17)) < 1e-6


def test_piecewise_constant_density_equals_discrete_code_length():
    """A density constant on each bin with mass q_k gives exactly -mean log2 q(k) bits/dim."""
    d = load_images("digits", "test")
    L = d.levels
    q = torch.rand(L, generator=torch.Generator().manual_seed(0)) + 0.1
    q = q / q.sum()

    def logp(v, y):
        k = ((v + 1) / 2 * L).floor().clamp(0, L - 1).long()
        return (torch.log(q[k]) - math.log(2.0 / L)).flatten(1).sum(1)  # density = mass / bin width

    expect = float(-torch.log2(q[d.ints.long()]).mean())
    assert abs(bits_per_dim(logp, d) - expect) < 1e-6

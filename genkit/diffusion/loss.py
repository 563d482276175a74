"""The EDM training loss (Karras et al. 2022, arXiv 2206.00364, Sec. 5 and Table 1; NVlabs/edm
``training/loss.py::EDMLoss``).

    sigma ~ exp(N(P_mean, P_std^2))                    (log-normal noise levels, P_mean=-1.2, P_std=1.2)
    lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma * sigma_data)^2
    L = lambda(sigma) * || D(y + sigma n, sigma) - y ||^2,   n ~ N(0, I)

With the EDM preconditioning, ``lambda(sigma) * c_out(sigma)^2 = 1``: the raw network's regression target
has unit weight at every noise level (EDM Eq. 8).  The loss returned is unreduced, one value per pixel
(the official code sums; genkit trains on the mean, a constant factor Adam does not see).
"""

from __future__ import annotations

import torch

from genkit.models.denoisers import SIGMA_DATA, broadcast_sigma


def edm_loss_weight(sigma: torch.Tensor | float, sigma_data: float = SIGMA_DATA) -> torch.Tensor:
    """lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2 (EDM Table 1, "loss weighting")."""
    sigma = torch.as_tensor(sigma, dtype=torch.float64 if not torch.is_tensor(sigma) else None)
    return (sigma ** 2 + sigma_data ** 2) / (sigma * sigma_data) ** 2


class EDMLoss:
    """``loss(D, y, noise_normal, sigma_normal, class_labels=None) -> (B, C, H, W)`` unreduced loss.

    The random numbers come in from the caller (standard normals ``noise_normal`` shaped like ``y`` and
    ``sigma_normal`` of shape (B,)), so a training step is a function of (seed, step) only.
    """

    def __init__(self, p_mean: float = -1.2, p_std: float = 1.2, sigma_data: float = SIGMA_DATA):
        self.p_mean = p_mean
        self.p_std = p_std
        self.sigma_data = sigma_data

    def sigmas(self, sigma_normal: torch.Tensor) -> torch.Tensor:
        """ln(sigma) ~ N(P_mean, P_std^2)."""
        return (sigma_normal * self.p_std + self.p_mean).exp()

    def __call__(self, denoiser, y: torch.Tensor, noise_normal: torch.Tensor, sigma_normal: torch.Tensor,
                 class_labels: torch.Tensor | None = None) -> torch.Tensor:
        sigma = self.sigmas(sigma_normal.to(y.device, torch.float32))  # (B,)
        weight = edm_loss_weight(sigma, self.sigma_data)  # (B,)
        n = noise_normal.to(y) * broadcast_sigma(sigma, y)  # (B, C, H, W)
        kw = {} if class_labels is None else {"class_labels": class_labels}
        d_yn = denoiser(y + n, sigma, **kw)  # (B, C, H, W)
        return broadcast_sigma(weight, y) * (d_yn.float() - y) ** 2

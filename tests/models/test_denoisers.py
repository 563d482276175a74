"""Denoisers: EDM preconditioning, the exact Gaussian-mixture denoiser, NFE counting, loading, diffusers."""

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from genkit.errors import ConfigError
from genkit.models.denoisers import EDMPrecond, GaussianMixtureDenoiser, NFECounter, load_denoiser

REPO = Path(__file__).resolve().parents[2]
MIXTURES = REPO / "recipes" / "mixtures"


class RecordingNet(nn.Module):
    """F(x, c_noise) = 3 x + c_noise, remembering its inputs."""

    def forward(self, x, c_noise, class_labels=None):
        self.seen = (x.clone(), c_noise.clone(), class_labels)
        return 3 * x + c_noise.reshape(-1, *([1] * (x.ndim - 1)))


def test_edm_precond_matches_table1():
    net = RecordingNet()
    d = EDMPrecond(net)
    x = torch.randn(2, 3, 4, 4)
    sigma = torch.tensor([0.5, 2.0])
    labels = torch.tensor([1, 0])
    out = d(x, sigma, class_labels=labels)
    # sigma = 0.5 = sigma_data: c_skip = 1/2, c_out = 0.5 * 0.5 / sqrt(0.5) = sqrt(2)/4, c_in = sqrt(2)
    # sigma = 2: c_skip = 0.25/4.25, c_out = 2 * 0.5 / sqrt(4.25), c_in = 1/sqrt(4.25); c_noise = ln(sigma)/4
    c_skip = torch.tensor([0.5, 0.25 / 4.25]).reshape(2, 1, 1, 1)
    c_out = torch.tensor([math.sqrt(2) / 4, 1 / math.sqrt(4.25)]).reshape(2, 1, 1, 1)
    c_in = torch.tensor([math.sqrt(2), 1 / math.sqrt(4.25)]).reshape(2, 1, 1, 1)
    c_noise = torch.tensor([math.log(0.5) / 4, math.log(2.0) / 4])
    x_in, c_noise_seen, labels_seen = net.seen
    torch.testing.assert_close(x_in, c_in * x)
    torch.testing.assert_close(c_noise_seen, c_noise)
    assert labels_seen is labels
    torch.testing.assert_close(out, c_skip * x + c_out * (3 * c_in * x + c_noise.reshape(2, 1, 1, 1)))
    # a scalar sigma is broadcast to every sample
    d(x, 0.5)
    torch.testing.assert_close(net.seen[1], torch.full((2,), math.log(0.5) / 4))


def small_mixture(full=True):
    g = torch.Generator().manual_seed(0)
    means = torch.randn(3, 2, generator=g, dtype=torch.float64)
    if full:
        a = torch.randn(3, 2, 2, generator=g, dtype=torch.float64)
        return GaussianMixtureDenoiser(means, covs=0.1 * a @ a.transpose(1, 2) + 0.02 * torch.eye(2),
                                       weights=[0.5, 0.3, 0.2])
    return GaussianMixtureDenoiser(means, stds=[0.1, 0.2, 0.3], weights=[0.5, 0.3, 0.2])


@pytest.mark.parametrize("full", [True, False])
def test_mixture_x0_closed_form(full):
    """E[x0|x] against the textbook formula with explicit (C_k + s^2 I)^-1 solves (no eigenbasis)."""
    gm = small_mixture(full)
    x = torch.randn(5, 2, dtype=torch.float64)
    sigma = torch.tensor([0.01, 0.3, 1.0, 3.0, 30.0], dtype=torch.float64)
    got = gm(x, sigma)
    for b in range(5):
        s2 = sigma[b] ** 2
        logits, x0s = [], []
        for k in range(gm.n_components):
            cov = gm.covs[k] + s2 * torch.eye(2, dtype=torch.float64)
            dist = torch.distributions.MultivariateNormal(gm.means[k], cov)
            logits.append(gm.weights[k].log() + dist.log_prob(x[b]))
            x0s.append(gm.means[k] + gm.covs[k] @ torch.linalg.solve(cov, x[b] - gm.means[k]))
        post = torch.stack(logits).softmax(0)
        torch.testing.assert_close(got[b], (post[:, None] * torch.stack(x0s)).sum(0), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(gm.log_prob(x[b:b + 1], sigma[b])[0], torch.stack(logits).logsumexp(0))


def test_mixture_x0_monte_carlo():
    """E[x0|x] = E_{x0~data}[x0 N(x; x0, s^2)] / E[N(x; x0, s^2)], estimated with 400k float64 samples."""
    gm = small_mixture()
    g = torch.Generator().manual_seed(1)
    x0 = gm.sample(400_000, generator=g)
    x = gm.means[:2] + 0.2  # near the data, where the importance weights are well spread
    sigma = 0.5
    logw = -((x[:, None, :] - x0[None]) ** 2).sum(-1) / (2 * sigma ** 2)  # (2, n)
    w = (logw - logw.max(1, keepdim=True).values).exp()
    mc = (w[..., None] * x0[None]).sum(1) / w.sum(1, keepdim=True)
    torch.testing.assert_close(gm(x, sigma), mc, atol=5e-3, rtol=0)


@pytest.mark.parametrize("full", [True, False])
def test_mixture_score_is_grad_log_prob_and_tweedie(full):
    gm = small_mixture(full)
    x = torch.randn(6, 2, dtype=torch.float64, requires_grad=True)
    sigma = torch.tensor([0.05, 0.1, 0.5, 1.0, 4.0, 20.0], dtype=torch.float64)
    (grad,) = torch.autograd.grad(gm.log_prob(x, sigma).sum(), x)
    torch.testing.assert_close(gm.score(x.detach(), sigma), grad, rtol=1e-9, atol=1e-12)
    tweedie = (gm(x.detach(), sigma) - x.detach()) / sigma[:, None] ** 2
    torch.testing.assert_close(gm.score(x.detach(), sigma), tweedie, rtol=1e-9, atol=1e-12)


def test_mixture_density_integrates_to_one_and_samples_match_moments():
    gm = small_mixture()
    axis = torch.linspace(-6, 6, 601, dtype=torch.float64)
    grid = torch.cartesian_prod(axis, axis)
    mass = gm.log_prob(grid, 0.2).exp().sum() * (axis[1] - axis[0]) ** 2
    assert abs(float(mass) - 1) < 1e-6
    xs = gm.sample(200_000, generator=torch.Generator().manual_seed(2))
    mean = (gm.weights[:, None] * gm.means).sum(0)
    torch.testing.assert_close(xs.mean(0), mean, atol=1e-2, rtol=0)


def test_mixture_float32_in_float32_out():
    gm = small_mixture()
    x = torch.randn(4, 2)
    assert gm(x, 1.0).dtype == torch.float32
    torch.testing.assert_close(gm(x, 1.0), gm(x.double(), 1.0).float())


@pytest.mark.parametrize("name, dim, modes", [("ring2d", 2, 8), ("grid2d", 2, 25), ("mix16d", 16, 10)])
def test_shipped_mixtures_load(name, dim, modes):
    path = MIXTURES / f"{name}.yaml"
    assert path.read_text().splitlines()[0].startswith("# genkit sample --model recipes/mixtures/")
    gm = load_denoiser(path)
    assert isinstance(gm, GaussianMixtureDenoiser)
    assert (gm.dim, gm.n_components) == (dim, modes)
    assert abs(float(gm.weights.sum()) - 1) < 1e-12
    again = load_denoiser(path)  # seeded layouts are reproducible
    torch.testing.assert_close(gm.means, again.means)
    torch.testing.assert_close(gm.evals, again.evals)


def test_load_denoiser_rejects_wrong_paths(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_denoiser(tmp_path / "nope.yaml")
    other = tmp_path / "recipe.yaml"
    other.write_text("kind: train_flow\nlr: 1e-3\n")
    with pytest.raises(ConfigError, match="not a Gaussian-mixture model file"):
        load_denoiser(other)
    (tmp_path / "folder").mkdir()
    with pytest.raises(ConfigError, match="neither a genkit diffusion teacher .* nor a diffusers"):
        load_denoiser(tmp_path / "folder")
    txt = tmp_path / "weights.bin"
    txt.write_bytes(b"\0")
    with pytest.raises(ConfigError, match="is not a model"):
        load_denoiser(txt)


def test_mixture_config_errors_reported_together(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("kind: gaussian_mixture\nmeans: {layout: ring, modes: 4}\nstd: -1\ncolour: red\n")
    with pytest.raises(ConfigError) as e:
        load_denoiser(bad)
    msg = str(e.value)
    assert "2 problems" in msg and "std:" in msg and "colour" in msg


def test_nfe_counter_counts_calls_and_rows():
    gm = small_mixture()
    counter = NFECounter(gm)
    counter(torch.zeros(7, 2, dtype=torch.float64), 1.0)
    counter(torch.zeros(3, 2, dtype=torch.float64), 1.0)
    assert (counter.calls, counter.rows) == (2, 10)
    assert counter.dim == 2  # attributes are forwarded
    counter.reset()
    assert (counter.calls, counter.rows) == (0, 0)


# --- diffusers adapter -------------------------------------------------------------------------------------


def tiny_unet(conditional=False):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    common = dict(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                  norm_num_groups=4)
    if conditional:
        return diffusers.UNet2DConditionModel(down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                              up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                                              cross_attention_dim=8, attention_head_dim=4, **common).eval()
    return diffusers.UNet2DModel(down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D"), **common).eval()


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_diffusers_adapter_vp_to_ve(tmp_path, prediction_type):
    diffusers = pytest.importorskip("diffusers")
    unet = tiny_unet()
    unet.save_pretrained(tmp_path / "unet")
    sched = diffusers.DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                    prediction_type=prediction_type)
    sched.save_pretrained(tmp_path / "scheduler")
    den = load_denoiser(tmp_path)  # pipeline-style folder: unet/ + scheduler/
    assert den.prediction_type == prediction_type
    acp = sched.alphas_cumprod.double()
    sigmas = ((1 - acp) / acp).sqrt()
    torch.testing.assert_close(den.sigmas, sigmas)

    # on the grid: t is the integer index; between two grid points: linear in log sigma
    i = 400
    mid = (sigmas[i].log() * 0.25 + sigmas[i + 1].log() * 0.75).exp()
    torch.testing.assert_close(den.sigma_to_t(torch.stack([sigmas[i], mid])),
                               torch.tensor([float(i), i + 0.75], dtype=torch.float64))

    x = torch.randn(2, 1, 8, 8)
    s = torch.stack([sigmas[i], mid]).float()
    with torch.no_grad():
        got = den(x, s)
        out = unet(x / (1 + s.reshape(-1, 1, 1, 1) ** 2).sqrt(), torch.tensor([i, i + 0.75])).sample
    sb = s.reshape(-1, 1, 1, 1)
    if prediction_type == "epsilon":
        want = x - sb * out
    else:
        want = x / (1 + sb ** 2) - sb / (1 + sb ** 2).sqrt() * out
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_diffusers_adapter_flat_folder_defaults_and_conditioning(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    unet = tiny_unet(conditional=True)
    unet.save_pretrained(tmp_path)  # flat folder, no scheduler config: DDPM defaults
    den = load_denoiser(tmp_path)
    acp = diffusers.DDPMScheduler().alphas_cumprod.double()
    torch.testing.assert_close(den.sigmas, ((1 - acp) / acp).sqrt())
    assert den.prediction_type == "epsilon"
    x = torch.randn(2, 1, 8, 8)
    ctx = torch.randn(2, 3, 8)
    with torch.no_grad():
        out = den(x, 1.5, encoder_hidden_states=ctx)
    assert out.shape == x.shape and torch.isfinite(out).all()

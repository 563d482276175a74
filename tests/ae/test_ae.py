"""genkit train-ae: a KL autoencoder from scratch written as a diffusers folder, STARFlow's decoder fine-tuning
(frozen encoder, discriminator stepped by its own optimizer), the official loss weights and the offline
perceptual terms."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from genkit.ae.losses import (LPIPS, ClassifierPerceptual, DecoderLoss, Discriminator, GANLoss, build_perceptual,
                              hinge_d_loss)
from genkit.errors import ConfigError
from support import run_genkit

torch.set_num_threads(1)

TINY = ["data.source=digits", "arch.block_out_channels=[8,8]", "arch.norm_num_groups=4", "train.batch_size=16",
        "train.warmup_steps=1", "eval_images=20", "runtime.log_every=1", "runtime.threads=1"]


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    out = tmp_path_factory.mktemp("ae") / "scratch"
    p = run_genkit("train-ae", *TINY, "loss.perceptual=none", "loss.gan_weight=0", "train.steps=3", "--out", out, "-q")
    assert "test PSNR" in p.stdout
    return out


def test_scratch_writes_a_diffusers_folder(scratch):
    from diffusers import AutoencoderKL

    m = json.loads((scratch / "metrics.json").read_text())
    ae = AutoencoderKL.from_pretrained(str(scratch / "ae"), use_safetensors=True)
    assert ae.config.scaling_factor == pytest.approx(m["scaling_factor"]) and m["scaling_factor"] > 0
    assert m["latent_shape"] == [4, 4, 4] and math.isfinite(m["test_psnr"]) and (scratch / "recon.png").is_file()
    assert not list(scratch.glob(".ae.*"))  # written to a temporary name, then renamed


def test_finetune_decoder_freezes_the_encoder_and_steps_the_discriminator(tmp_path, scratch):
    from genkit import config as C
    from genkit.ae.train import AERecipe, train_ae

    cfg = C.load(AERecipe, None, [*TINY, "mode=finetune-decoder", f"ae={scratch / 'ae'}", "train.steps=2",
                                  "loss.disc_width=8", "loss.disc_stages=1", "loss.disc_pool=2", "train.lr=1e-2",
                                  "runtime.checkpoint_every=1"])
    out = tmp_path / "ft"
    m = train_ae(cfg, out, quiet=True)
    before = load_file(str(scratch / "ae" / "diffusion_pytorch_model.safetensors"))
    after = load_file(str(out / "ae" / "diffusion_pytorch_model.safetensors"))
    frozen = [k for k in before if k.startswith(("encoder.", "quant_conv."))]
    trained = [k for k in before if k.startswith(("decoder.", "post_quant_conv."))]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)
    assert any(not torch.equal(before[k], after[k]) for k in trained)
    assert m["scaling_factor"] == pytest.approx(json.loads((scratch / "ae" / "config.json").read_text())["scaling_factor"])
    # the discriminator (second prepared model of the checkpoints) changes between steps 1 and 2: it has its own
    # optimizer step (the official unscaled branch steps the generator's optimizer instead, so it would not)
    d1, d2 = (load_file(str(out / "checkpoints" / f"step-0000000{s}" / "state" / "model_1.safetensors")) for s in (1, 2))
    assert any(not torch.equal(d1[k], d2[k]) for k in d1 if k.startswith("disc.") and "weight" in k)
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert {"l2", "p1", "p2", "g_loss", "d_loss", "lecam"} <= set(log[-1])


def test_official_loss_weights():
    class Fixed(torch.nn.Module):
        def forward(self, a, b):
            return torch.tensor(2.0), torch.tensor(3.0)

    real, fake = torch.zeros(2, 1, 4, 4), torch.full((2, 1, 4, 4), 0.5)
    gan = GANLoss(Discriminator(1, 8, 1, 2))
    loss = DecoderLoss(Fixed(), perceptual_weight=1.1, second_weight=0.1, gan=gan, gan_weight=0.1)
    total, parts = loss(real, fake)
    g = -gan.disc(fake).mean()
    expected = 0.25 + 1.1 * (2.0 + 0.1 * 3.0) / 1.1 + 0.1 * g  # official: L2 + 1.1 * (P1 + 0.1 P2) / 1.1 + 0.1 GAN
    assert torch.allclose(total, expected) and parts["l2"] == pytest.approx(0.25)
    assert hinge_d_loss(torch.tensor([2.0, 0.0]), torch.tensor([-2.0, 0.5])).item() == pytest.approx(0.5 * (0.5 + 0.75))
    # generator loss reaches the images only
    fake = fake.clone().requires_grad_(True)
    gan.generator_loss(fake).backward()
    assert fake.grad is not None and all(p.grad is None for p in gan.parameters())


def test_classifier_perceptual_terms():
    p = ClassifierPerceptual("mnist5k")
    x = torch.rand(3, 1, 32, 32) * 2 - 1  # padded 32x32 images: resized to the classifier's 28x28
    p1, p2 = p(x, x)
    assert p1.item() == pytest.approx(0.0, abs=1e-6) and p2.item() == pytest.approx(0.0, abs=1e-6)
    p1, p2 = p(x, x.flip(-1))
    assert p1.item() > 0 and p2.item() > 0
    with pytest.raises(ConfigError, match="no shipped classifier"):
        build_perceptual("classifier", "some/folder")


def test_lpips_folder_by_path(tmp_path):
    from safetensors.torch import save_file

    with pytest.raises(ConfigError, match="vgg16.safetensors"):
        LPIPS(tmp_path)
    torch.manual_seed(0)
    net = LPIPS.__new__(LPIPS)
    torch.nn.Module.__init__(net)
    cfg, vgg, cin, i = LPIPS.CFG, {}, 3, 0
    for v in cfg:
        if v == "M":
            i += 1
            continue
        vgg[f"features.{i}.weight"] = torch.randn(v, cin, 3, 3) * 0.1
        vgg[f"features.{i}.bias"] = torch.zeros(v)
        cin, i = v, i + 2
    save_file(vgg, str(tmp_path / "vgg16.safetensors"))
    save_file({f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1) for k, c in enumerate((64, 128, 256, 512, 512))},
              str(tmp_path / "lpips_vgg.safetensors"))
    lp = build_perceptual(f"lpips:{tmp_path}", "digits")
    x = torch.rand(2, 1, 32, 32) * 2 - 1
    assert lp(x, x)[0].item() == pytest.approx(0.0, abs=1e-6) and lp(x, -x)[0].item() > 0


def test_bad_input_is_one_line(tmp_path, capsys):
    p = run_genkit("train-ae", "mode=finetune-decoder", "--out", tmp_path / "x", check=False)
    assert p.returncode == 2 and "ae: mode=finetune-decoder needs" in p.stderr and len(p.stderr.splitlines()) == 1
    from genkit.cli import main  # the other two in-process: the same entry point, one interpreter start-up saved each

    assert main(["train-ae", "mode=finetune-decoder", f"ae={tmp_path / 'nowhere'}", "--out", str(tmp_path / "x")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["train-ae", "mode=finetune-decoder", f"ae={tmp_path / 'empty'}", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "no config.json" in err and len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_convnext_folder_by_path(tmp_path):
    """torchvision-named ConvNeXt-S weights (random here: no weights exist offline) load by folder; P2 = logits MSE."""
    from safetensors.torch import save_file

    from genkit.ae.losses import ConvNeXtLogits

    with pytest.raises(ConfigError, match="convnext_small.safetensors"):
        ConvNeXtLogits(tmp_path)
    g = torch.Generator().manual_seed(0)
    sd = {k: torch.randn(v.shape, generator=g) * 0.02 for k, v in ConvNeXtLogits(None).state_dict().items()
          if k not in ("mean", "std")}
    # torchvision's names and shapes (torchvision.models.convnext_small), e.g. stage 3 has 27 blocks of width 384
    for k, shape in {"features.0.0.weight": (96, 3, 4, 4), "features.0.1.weight": (96,),
                     "features.5.26.block.0.weight": (384, 1, 7, 7), "features.5.26.block.3.weight": (1536, 384),
                     "features.5.26.layer_scale": (384, 1, 1), "features.6.1.weight": (768, 384, 2, 2),
                     "classifier.0.weight": (768,), "classifier.2.weight": (1000, 768)}.items():
        assert tuple(sd[k].shape) == shape, k
    save_file(sd, str(tmp_path / "convnext_small.safetensors"))
    cn = build_perceptual("classifier", "mnist5k", f"convnext:{tmp_path}")
    x = torch.rand(2, 1, 32, 32) * 2 - 1
    p1, p2 = cn(x, x.flip(-1))
    assert p1.item() == pytest.approx(ClassifierPerceptual("mnist5k")(x, x.flip(-1))[0].item()) and p2.item() > 0

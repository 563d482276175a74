"""`genkit sample --model`: outputs, NFE counted, and one-line errors for bad input."""

import json

from support import run_genkit


def test_mixture_sampling_writes_outputs(tmp_path):
    out = tmp_path / "s"
    run_genkit("sample", "--model", "recipes/mixtures/grid2d.yaml", "sampler=heun", "nfe=35", "--n", "500",
               "--out", out, "-q")
    m = json.loads((out / "metrics.json").read_text())
    assert m["nfe"] == 35 and m["steps"] == 18  # Heun: 2N-1 evaluations, counted by wrapping the denoiser
    assert m["mode_tv"] < 0.1 and (out / "samples.png").is_file() and (out / "samples.npz").is_file()


def test_bad_sampler_nfe_and_model_are_one_line(tmp_path):
    p = run_genkit("sample", "--model", "recipes/mixtures/ring2d.yaml", "sampler=ddim", check=False)
    assert p.returncode == 2 and "euler, heun, dpmpp-2m, unipc, tada" in p.stderr and "Traceback" not in p.stderr
    p = run_genkit("sample", "--model", "recipes/mixtures/ring2d.yaml", "sampler=heun", "nfe=2", "--out",
                   tmp_path / "x", check=False)
    assert p.returncode == 2 and "nfe=2 is too small" in p.stderr
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "config.json").write_text(json.dumps({"model_type": "llada"}))
    p = run_genkit("sample", "--model", tmp_path / "folder", "--out", tmp_path / "y", check=False)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1 and "neither a genkit" in p.stderr
    p = run_genkit("sample", "--out", tmp_path / "z", check=False)
    assert p.returncode == 2 and "exactly one of --ckpt" in p.stderr


def test_tada_and_unipc_through_the_cli(tmp_path):
    """sampler=tada / unipc on the three kinds of model: a mixture YAML (exact metrics), a class-conditional
    genkit teacher with classifier-free guidance, a diffusers UNet folder; bad TADA knobs are one line."""
    import numpy as np
    import pytest
    import torch

    from genkit.diffusion.io import teacher_config
    from genkit.diffusion.networks import UNet, UNetConfig
    from genkit.runtime.checkpoint import save_model_folder

    run_genkit("sample", "--model", "recipes/mixtures/grid2d.yaml", "sampler=tada", "nfe=10", "grid=uniform",
               "ab_order=2", "--n", "1000", "--out", tmp_path / "mix", "-q")
    m = json.loads((tmp_path / "mix" / "metrics.json").read_text())
    assert m["nfe"] == 10 and m["settings"]["grid"] == "uniform" and m["mode_tv"] < 0.12

    torch.manual_seed(0)
    net = UNet(UNetConfig(img_size=8, model_channels=8, channel_mult=(1, 2), num_blocks=1, attn_resolutions=(),
                          num_heads=2, num_classes=3))
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "conv_out" in name or "conv1" in name:
                p.normal_(0, 0.05)  # the zero-initialised output layers would make the net's output 0
    data = {"source": "digits", "shape": [1, 8, 8], "num_classes": 3}
    save_model_folder(tmp_path / "teacher" / "model", dict(net.state_dict()), teacher_config(net, 0.5, 0.002, 80.0,
                                                                                           data))
    outs = {}
    for w in ("0", "2"):
        out = tmp_path / f"cfg{w}"
        run_genkit("sample", "--model", tmp_path / "teacher", "sampler=tada", "nfe=5", f"cfg={w}", "label=1",
                   "--n", "6", "--out", out, "-q")
        assert json.loads((out / "metrics.json").read_text())["nfe"] == 5
        outs[w] = np.load(out / "samples.npz")["images"]
    assert outs["0"].shape == (6, 1, 8, 8) and np.abs(outs["0"] - outs["2"]).max() > 1e-4  # guidance acts

    diffusers = pytest.importorskip("diffusers")
    diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                          layers_per_block=1, norm_num_groups=4, down_block_types=("DownBlock2D", "DownBlock2D"),
                          up_block_types=("UpBlock2D", "UpBlock2D")).save_pretrained(tmp_path / "unet")
    for sampler in ("tada", "unipc"):
        out = tmp_path / f"unet-{sampler}"
        run_genkit("sample", "--model", tmp_path / "unet", f"sampler={sampler}", "nfe=4", "--n", "4", "--out", out,
                   "-q")
        assert json.loads((out / "metrics.json").read_text())["nfe"] == 4
        assert np.isfinite(np.load(out / "samples.npz")["images"]).all()

    p = run_genkit("sample", "--model", "recipes/mixtures/ring2d.yaml", "sampler=tada", "k=0", "--out",
                   tmp_path / "bad", check=False)
    assert p.returncode == 2 and "k: must be > 0" in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr

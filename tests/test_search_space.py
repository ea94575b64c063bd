"""Search spaces as data: every shipped file loads and names only real config keys; bad files fail clearly."""

from __future__ import annotations

from pathlib import Path

import pytest

from rgnet.config import ConfigError, all_keys, apply_overrides
from rgnet.search_space import VARIANT_KEY, load_space, trial_overrides

SPACES = sorted((Path(__file__).resolve().parent.parent / "tune_spaces").glob("*.yaml"))
REQUIRED = {"proposals", "sampler", "losses", "ablations", "smoke"}


def test_required_spaces_ship() -> None:
    assert {p.stem for p in SPACES} >= REQUIRED


@pytest.mark.parametrize("path", SPACES, ids=lambda p: p.stem)
def test_every_space_loads_and_each_point_makes_a_valid_config(path: Path) -> None:
    space = load_space(path)
    keys = set(all_keys())
    assert set(space.params) <= keys
    assert all(set(bundle) <= keys for bundle in space.variants.values())
    base = space.base_config()
    # the corners of every distribution (and every variant) build a config that passes validation
    for key, dist in space.params.items():
        for value in dist.values:
            cfg = apply_overrides(base, trial_overrides(space, {key: value}))
            assert cfg is not None
    for name in space.variants:
        apply_overrides(base, trial_overrides(space, {VARIANT_KEY: name}))


def test_trial_overrides_set_the_values() -> None:
    space = load_space(next(p for p in SPACES if p.stem == "ablations"))
    cfg = apply_overrides(space.base_config(), trial_overrides(space, {VARIANT_KEY: "disjoint_baseline"}))
    assert (cfg.model.encoder, cfg.model.sampler.kind, cfg.model.retrieval) == ("plain", "none", "none")
    assert cfg.loss.contrastive_weight == 0.0
    smoke = load_space(next(p for p in SPACES if p.stem == "smoke"))
    cfg = apply_overrides(smoke.base_config(), trial_overrides(smoke, {"optim.lr": 1e-4, "eval.top_k_windows": 2}))
    assert (cfg.optim.lr, cfg.eval.top_k_windows, cfg.train.epochs) == (1e-4, 2, 3)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        (
            "space:\n  optim.weight_decy: {uniform: [0.1, 1.0]}\n",
            r"'optim.weight_decy' is not a config key; did you mean 'optim.weight_decay'",
        ),
        ("space:\n  optim.lr: {normal: [0.1, 1.0]}\n", r"unknown distribution 'normal'"),
        ("space:\n  optim.lr: {uniform: [1.0, 0.1]}\n", r"low < high"),
        ("space:\n  optim.lr: {loguniform: [0.0, 0.1]}\n", r"low > 0"),
        ("space:\n  eval.top_k_windows: {int: [1.5, 4]}\n", r"integer bounds"),
        ("space:\n  model.mask_mode: {choice: [hard, soft]}\n", r"value 'soft' for 'model.mask_mode' is not accepted"),
        ("space:\n  model.mask_mode: {grid: [hard, hard]}\n", r"lists a value twice"),
        ("space: {}\n", r"searches nothing"),
        ("preset: nope\nspace:\n  optim.lr: {uniform: [0.1, 1.0]}\n", r"unknown preset 'nope'"),
        ("spaces:\n  optim.lr: {uniform: [0.1, 1.0]}\n", r"unknown top-level keys \['spaces'\]"),
        ("variants:\n  grid:\n    a: {model.encoder: fancy}\n", r"variant 'a' is not a valid config"),
        ("fixed:\n  optim.lr: 0.1\nspace:\n  optim.lr: {uniform: [0.1, 1.0]}\n", r"both fixed and searched"),
        ("space: [1, 2\n", r"not valid YAML"),
    ],
)
def test_bad_space_files_name_file_and_key(tmp_path: Path, text: str, match: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=match) as err:
        load_space(path)
    assert str(path) in str(err.value)


def test_missing_space_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read search space"):
        load_space(tmp_path / "nope.yaml")

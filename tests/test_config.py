"""The typed config tree: presets, overrides, strict keys and types, round trips."""

from __future__ import annotations

import pytest
import yaml

from rgnet.config import (
    Config,
    ConfigError,
    all_keys,
    available_presets,
    from_dict,
    load_config,
    save_yaml,
    to_dict,
    to_yaml,
)


def test_presets_ship_and_load() -> None:
    assert set(available_presets()) >= {"mad", "ego4d", "synthetic-mad", "synthetic-ego4d", "tiny"}
    for name in available_presets():
        cfg = load_config(name)
        assert isinstance(cfg, Config)


@pytest.mark.parametrize("name", [None, "tiny", "mad", "synthetic-ego4d"])
def test_round_trip_dict_and_yaml(name: str | None, tmp_path) -> None:
    cfg = load_config(name, overrides=["optim.lr_drop_epochs=[3, 7]", "model.sampler.temperature=0.5"])
    assert from_dict(to_dict(cfg)) == cfg
    assert from_dict(yaml.safe_load(to_yaml(cfg))) == cfg
    save_yaml(cfg, tmp_path / "c.yaml")
    assert load_config(config_file=tmp_path / "c.yaml") == cfg


def test_overrides_apply_in_order_and_coerce() -> None:
    cfg = load_config("tiny", overrides=["train.epochs=3", "optim.lr=3e-4", "train.epochs=4", "eval.profile=geq"])
    assert cfg.train.epochs == 4
    assert cfg.optim.lr == pytest.approx(3e-4) and isinstance(cfg.optim.lr, float)
    assert cfg.eval.profile == "geq"
    # preset values survive unrelated overrides
    assert cfg.model.hidden_dim == load_config("tiny").model.hidden_dim


def test_free_text_keys_take_the_text_as_given() -> None:
    """Paths, URIs and names are not YAML: a colon, a leading zero or a bracket stays text; quotes still quote."""
    over = ["train.init_from=w/a b: c.pt", "train.run_name=007", "data.root=[x]", 'tracking.uri="sqlite:///a b.db"']
    cfg = load_config("tiny", overrides=over)
    assert (cfg.train.init_from, cfg.train.run_name, cfg.data.root) == ("w/a b: c.pt", "007", "[x]")
    assert cfg.tracking.uri == "sqlite:///a b.db"
    with pytest.raises(ConfigError, match="train.epochs must be an integer"):  # typed keys still parse as YAML
        load_config(overrides=["train.epochs=a: b"])


def test_unknown_key_names_nearest() -> None:
    with pytest.raises(ConfigError, match="did you mean 'model.sampler.temperature'"):
        load_config(overrides=["model.sampler.temprature=0.4"])
    with pytest.raises(ConfigError, match="did you mean 'train.epochs'"):
        from_dict({"train": {"epoch": 3}})


def test_bad_values_are_explained() -> None:
    with pytest.raises(ConfigError, match="model.mask_mode='soft' is not one of"):
        load_config(overrides=["model.mask_mode=soft"])
    with pytest.raises(ConfigError, match="train.epochs must be an integer"):
        load_config(overrides=["train.epochs=2.5"])
    with pytest.raises(ConfigError, match="must look like key=value"):
        load_config(overrides=["train.epochs"])
    with pytest.raises(ConfigError, match="divisible by model.num_heads"):
        load_config(overrides=["model.hidden_dim=30", "model.num_heads=4"])
    with pytest.raises(ConfigError, match="unknown preset 'tinny'.*did you mean 'tiny'"):
        load_config("tinny")


def test_bad_config_file(tmp_path) -> None:
    p = tmp_path / "bad.yaml"
    p.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(config_file=p)
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(config_file=tmp_path / "missing.yaml")
    p.write_text("trian:\n  epochs: 3\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'trian'.*bad.yaml.*did you mean 'train"):
        load_config(config_file=p)


def test_all_keys_cover_the_tree() -> None:
    keys = all_keys()
    assert "model.sampler.temperature" in keys and "windows.length_sec" in keys and "optim.lr" in keys
    assert "eval.top_k_windows" in keys and "loss.contrastive_weight" in keys and "loss.sampling_weight" in keys
    assert len(keys) == len(set(keys))

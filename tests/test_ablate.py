"""``rgnet ablate``: the ablation table over seeds from local child runs, on the tiny preset (no Ray); the interval
arithmetic of its table by hand on fixed numbers."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from helpers import tiny_seeds_argv

from pipelines import ablate, ablation
from pipelines.tracking import metric_key
from rgnet.config import ConfigError, load_config
from rgnet.data.dataset import open_split
from rgnet.model import build_model
from rgnet.train.loop import evaluate_model, seed_everything

PNG = b"\x89PNG\r\n\x1a\n"
T975_2 = 4.302652729911275  # Student t, 0.975 quantile, 2 degrees of freedom
T975_1 = 12.706204736174698  # ... 1 degree of freedom


def args(tmp: Path, *extra: str, seeds: str = "2") -> list[str]:
    options = ["--variants", "full,no_contrastive", "--name", "t"]
    return tiny_seeds_argv(tmp, *extra, epochs=2, options=options, seeds=seeds)


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ablate")
    assert ablate.main(args(tmp)) == 0
    return tmp, tmp / "runs" / "t"


# ---------------------------------------------------------------------------------------------------------------
# The table's arithmetic, by hand
# ---------------------------------------------------------------------------------------------------------------
def _row(variant: str, seed: int, r1: float, rr1: float) -> dict:
    metrics = {"R1@0.3": r1, "retrieval_R1": rr1}
    return {"variant": variant, "seed": seed, "val": dict(metrics), "test": dict(metrics)}


def test_summary_means_intervals_and_paired_differences_by_hand() -> None:
    rows = [
        _row("full", 0, 60.0, 90.0),
        _row("full", 1, 66.0, 80.0),
        _row("full", 2, 63.0, 85.0),
        # listed in another seed order: pairing must follow the seed, not the position
        _row("ablated", 2, 58.0, 85.0),
        _row("ablated", 0, 55.0, 91.0),
        _row("ablated", 1, 61.0, 80.0),
    ]
    table = ablation.summarise(rows, ["full", "ablated"], "full")
    full = table["summary"]["full"]["test"]["R1@0.3"]
    # 60, 66, 63: mean 63, s = 3, half width t(0.975, 2) * 3 / sqrt(3)
    half = T975_2 * 3 / math.sqrt(3)
    assert full["seeds"] == [0, 1, 2] and full["values"] == [60.0, 66.0, 63.0]
    assert full["mean"] == 63.0 and full["low"] == pytest.approx(63 - half) and full["high"] == pytest.approx(63 + half)
    ablated = table["summary"]["ablated"]["test"]["R1@0.3"]
    assert ablated["values"] == [55.0, 61.0, 58.0] and ablated["mean"] == 58.0  # seed order 0, 1, 2
    # the paired difference: seed 0: 55-60, seed 1: 61-66, seed 2: 58-63 -> -5 every seed, a zero-width interval
    d = table["differences"]["ablated"]["test"]["R1@0.3"]
    assert d["values"] == [-5.0, -5.0, -5.0] and (d["mean"], d["low"], d["high"]) == (-5.0, -5.0, -5.0)
    assert ablation.verdict(d) == "lower"
    # the two rows' own intervals overlap (58 + 7.45 > 63 - 7.45): pairing by seed is what decides it
    assert ablated["high"] > full["low"]
    # retrieval: +1, 0, 0 -> mean 1/3, s = 1/sqrt(3), half = t * s / sqrt(3) = t / 3: contains 0, undecided
    r = table["differences"]["ablated"]["test"]["retrieval_R1"]
    assert r["values"] == [1.0, 0.0, 0.0]
    assert r["mean"] == pytest.approx(1 / 3) and r["high"] - r["mean"] == pytest.approx(T975_2 / 3)
    assert ablation.verdict(r) == "undecided"
    assert "full" not in table["differences"]  # the reference has no difference to itself


def test_markdown_marks_decided_differences_and_formats_intervals() -> None:
    rows = [_row("full", s, v, 50.0) for s, v in ((0, 60.0), (1, 66.0))] + [
        _row("x", s, v, 50.0 + s) for s, v in ((0, 50.0), (1, 56.0))
    ]
    table = {**ablation.summarise(rows, ["full", "x"], "full"), "seeds": [0, 1], "threads": 1}
    text = ablation.markdown_table(table, ["full", "x"], {"x": "k=v"}, {"x": "paper row X"}, "full")
    half = T975_1 * math.sqrt(18) / math.sqrt(2)  # values 60, 66: s = sqrt(18)
    assert f"63.0 [{63 - half:.1f}, {63 + half:.1f}]" in text
    # x - full: -10, -10 on R1@0.3 (decided, bold); 0, +1 on retrieval_R1 (undecided, plain)
    assert "**-10.0 [-10.0, -10.0]**" in text
    assert f"+0.5 [{0.5 - T975_1 * math.sqrt(0.5) / math.sqrt(2):+.1f}, " in text
    assert "| x | paper row X | k=v |" in text
    one = {**ablation.summarise(rows[:1] + rows[2:3], ["full", "x"], "full"), "seeds": [0], "threads": 1}
    text = ablation.markdown_table(one, ["full", "x"], {}, {}, "full")
    assert text.endswith("| x | +0.0 | -10.0 |\n")  # one seed: the value alone, never decided (not bold)


def test_pairing_needs_the_same_seeds() -> None:
    rows = [_row("full", 0, 1.0, 1.0), _row("full", 1, 2.0, 2.0), _row("x", 0, 1.0, 1.0), _row("x", 2, 1.0, 1.0)]
    with pytest.raises(ValueError, match="same seeds"):
        ablation.summarise(rows, ["full", "x"], "full")
    with pytest.raises(ValueError, match="two rows for full seed 0"):
        ablation.summarise([*rows, _row("full", 0, 1.0, 1.0)], ["full", "x"], "full")


def test_seeds_and_reserved_overrides() -> None:
    assert ablation.parse_seeds(3, None) == [0, 1, 2]
    assert ablation.parse_seeds(3, "7, 5") == [7, 5]
    for seeds, seed_list, message in ((0, None, "--seeds must be >= 1"), (1, "1,1", "twice"), (1, "a", "integers")):
        with pytest.raises(ConfigError, match=message):
            ablation.parse_seeds(seeds, seed_list)


def test_a_run_lock_is_exclusive(tmp_path) -> None:
    first = ablation._try_lock(tmp_path / "x" / "seed0.lock")
    assert first is not None
    assert ablation._try_lock(tmp_path / "x" / "seed0.lock") is None  # another holder is refused, not blocked
    first.close()
    again = ablation._try_lock(tmp_path / "x" / "seed0.lock")
    assert again is not None
    again.close()


# ---------------------------------------------------------------------------------------------------------------
# The command end to end (tiny preset, 2 seeds, 2 variants)
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.slow  # the `table` fixture trains 2 variants x 2 seeds (about 20 s)
def test_table_rows_files_and_run_configs(table) -> None:
    _, out = table
    data = json.loads((out / "ablation.json").read_text())
    assert [(r["variant"], r["seed"]) for r in data["rows"]] == [
        ("untrained", 0),
        ("untrained", 1),
        ("full", 0),
        ("no_contrastive", 0),
        ("full", 1),
        ("no_contrastive", 1),
    ]
    assert data["seeds"] == [0, 1] and data["threads"] == 1 and data["reference"] == "full"
    for row in data["rows"]:
        for split in ("val", "test"):
            assert {"retrieval_R1", "R1@0.3", "mIoU"} <= set(row[split])
    assert [r["epochs"] for r in data["rows"][2:]] == [2, 2, 2, 2]
    assert all(r["wall_seconds"] > 0 for r in data["rows"][2:])
    assert data["changes"]["no_contrastive"] == {"loss.contrastive_weight": 0.0}
    # each child trained its variant's config with its seed and the table's thread count
    for variant, weight in (("full", 1.0), ("no_contrastive", 0.0)):
        for seed in (0, 1):
            cfg = load_config(config_file=out / variant / f"seed{seed}" / "config.yaml")
            assert (cfg.loss.contrastive_weight, cfg.train.seed, cfg.train.threads) == (weight, seed, 1)
            assert cfg.train.epochs == 2
    # the table's values are the children's own test reports, and the summary is over both seeds
    report = json.loads((out / "no_contrastive" / "seed1" / "report_test.json").read_text())
    assert data["rows"][5]["test"] == report["metrics"]
    s = data["summary"]["no_contrastive"]["test"]["R1@0.3"]
    assert s["values"] == [data["rows"][3]["test"]["R1@0.3"], report["metrics"]["R1@0.3"]]
    d = data["differences"]["no_contrastive"]["test"]["R1@0.3"]
    assert d["values"] == [data["rows"][3]["test"]["R1@0.3"] - data["rows"][2]["test"]["R1@0.3"], d["values"][1]]
    md = (out / "ablation.md").read_text()
    assert "| untrained |" in md and "loss.contrastive_weight=0.0" in md and "Paired difference to `full`" in md
    assert (out / "ablation.png").read_bytes()[:8] == PNG


@pytest.mark.slow
def test_untrained_rows_are_the_seeded_initial_models(table) -> None:
    _, out = table
    rows = json.loads((out / "ablation.json").read_text())["rows"]
    for seed in (0, 1):
        cfg = load_config(config_file=out / "full" / f"seed{seed}" / "config.yaml")
        seed_everything(seed)
        model = build_model(cfg.model, cfg.data.video_dim, cfg.data.text_dim)
        report, _ = evaluate_model(
            model, open_split(cfg.data, cfg.data.test_split), cfg.windows, cfg.eval, torch.device("cpu")
        )
        (row,) = [r for r in rows if r["variant"] == "untrained" and r["seed"] == seed]
        assert row["test"] == report["metrics"]


@pytest.mark.slow
def test_rerun_resumes_per_variant_and_seed_and_refuses_a_changed_config(table, capsys) -> None:
    tmp, out = table
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("*/seed*/best.pt")}
    assert len(stamps) == 4
    assert ablate.main(args(tmp)) == 0
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # nothing trained again
    capsys.readouterr()
    assert ablate.main([*args(tmp), "train.epochs=3"]) == 2
    assert "holds a run with another config" in capsys.readouterr().err
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # nothing overwritten
    # another table over the same runs folder with a third seed trains that seed's runs only
    assert ablate.main(args(tmp, "--name", "t3", "--runs-dir", str(out), seeds="3")) == 0
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    data = json.loads((out.parent / "t3" / "ablation.json").read_text())
    assert data["seeds"] == [0, 1, 2] and sorted(data["trained_now"]) == ["full-seed2", "no_contrastive-seed2"]
    assert data["summary"]["full"]["test"]["R1@0.3"]["n"] == 3
    assert data["rows"][3]["test"] == json.loads((out / "ablation.json").read_text())["rows"][2]["test"]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--variants", "full,no_such"], "unknown variant(s) no_such"),
        (["--space", "smoke"], "has no variants"),
        (["--parallel", "0"], "--parallel must be >= 1"),
        (["--threads", "0"], "--threads must be >= 1"),
        (["--reference", "encoder_plain", "--variants", "full"], "--reference encoder_plain is not one of"),
        (["--space", "nowhere"], "search space 'nowhere' not found"),
        (["train.seed=3"], "use --seeds/--seed-list for train.seed"),
        (["train.threads=2"], "--threads for train.threads"),
    ],
)
def test_bad_arguments_are_explained(tmp_path, capsys, extra, message) -> None:
    argv = ["--preset", "tiny", f"data.root={tmp_path / 'data'}", f"train.output_dir={tmp_path / 'runs'}", *extra]
    assert ablate.main(argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("*.pt"))


@pytest.mark.slow
def test_mlflow_parent_run_and_a_child_run_per_variant_and_seed(table) -> None:
    """`rgnet ablate` with tracking (on by default): the table and plot on a parent run, one child run per row and
    seed with rgnet train's metric names, the final val/test metrics of the table, datasets and source; a re-run of
    the same table adds no run and no epoch."""
    from mlflow import MlflowClient

    tmp, out = table
    client = MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}")

    def runs() -> tuple[object, dict[tuple[str, str], object]]:
        exp = client.get_experiment_by_name("rgnet")
        assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
        found = client.search_runs([exp.experiment_id], filter_string="tags.`rgnet.ablation` = 't'")
        (parent,) = [r for r in found if "mlflow.parentRunId" not in r.data.tags]
        kids = {
            (r.data.tags["rgnet.variant"], r.data.tags["rgnet.seed"]): r
            for r in found
            if r.data.tags.get("mlflow.parentRunId")
        }
        assert len(kids) == len(found) - 1 and all(
            r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in kids.values()
        )
        return parent, kids

    assert ablate.main(args(tmp)) == 0  # a re-run: nothing trained, nothing logged twice
    parent, kids = runs()
    assert parent.info.run_name == "ablate-t" and parent.info.status == "FINISHED"
    assert parent.data.tags["mlflow.source.name"] == "rgnet ablate"
    files = {f.path for f in client.list_artifacts(parent.info.run_id, "ablation")}
    assert files == {"ablation/ablation.md", "ablation/ablation.json", "ablation/ablation.png"}
    data = json.loads((out / "ablation.json").read_text())
    assert set(kids) == {(row["variant"], str(row["seed"])) for row in data["rows"]}
    assert len(kids) == 6  # untrained, full, no_contrastive x seeds 0, 1 (the 3-seed table t3 has runs of its own)
    for row in data["rows"]:
        run = kids[(row["variant"], str(row["seed"]))]
        assert run.info.status == "FINISHED" and run.info.run_name == f"{row['variant']}-seed{row['seed']}"
        assert run.data.params["train.seed"] == str(row["seed"])
        for split in ("val", "test"):
            for name, value in row[split].items():
                assert run.data.metrics[metric_key(f"final_{split}/{name}")] == pytest.approx(value), (split, name)
        contexts = sorted(d.tags[0].value for d in run.inputs.dataset_inputs)
        assert contexts == ["test", "train", "val"]
    assert kids[("no_contrastive", "0")].data.params["loss.contrastive_weight"] == "0.0"
    assert kids[("full", "1")].data.params["loss.contrastive_weight"] == "1.0"
    # the per-epoch curves, under the names a distributed rgnet train run logs, each epoch once
    rid = kids[("full", "0")].info.run_id
    for key in ("epoch", "train/loss", "val/R1_at_0.3", "val/retrieval_R1"):
        assert sorted(int(m.step) for m in client.get_metric_history(rid, key)) == [1, 2], key
    assert client.get_metric_history(kids[("untrained", "0")].info.run_id, "epoch") == []


def test_changed_config_in_a_shared_runs_folder_is_refused(tmp_path) -> None:
    """Two tables over one runs folder share a run only when its config is the same."""
    from pipelines.common import resolve_space_path
    from rgnet.config import to_yaml
    from rgnet.search_space import load_space

    space = load_space(resolve_space_path("paper_tab4"))
    runs = tmp_path / "runs"
    configs = ablation.plan_runs(space, ["full"], [0], 1, runs, ["train.epochs=1"])
    folder = ablation.run_dir(runs, "full", 0)
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(
        to_yaml(ablation.plan_runs(space, ["full"], [0], 1, runs, ["train.epochs=2"])[("full", 0)])
    )
    with pytest.raises(ConfigError, match="holds a run with another config"):
        ablation.check_runs(configs, runs, fresh=False)
    tab3 = load_space(resolve_space_path("paper_tab3"))
    same = ablation.plan_runs(tab3, ["full"], [0], 1, runs, ["train.epochs=2"])
    ablation.check_runs(same, runs, fresh=False)  # tab3's full is tab4's full: shared, not refused

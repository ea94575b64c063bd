"""``rgnet study``: the paper's claims as studies built on ablate / tune / evaluate; the evaluation-only sweeps
(rgnet.eval.sweep); the study tables' arithmetic by hand; the tiny preset end to end."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import pytest
import torch
from helpers import tiny_seeds_argv

from pipelines import evaluate, study
from pipelines.common import resolve_space_path
from pipelines.evaluation import evaluate_checkpoint
from rgnet.config import ConfigError, apply_overrides, load_config
from rgnet.eval.predictions import PredictionRow
from rgnet.eval.sweep import decoded_windows, evaluate_settings, topk_settings
from rgnet.search_space import VARIANT_KEY, load_space, trial_overrides

PNG = b"\x89PNG\r\n\x1a\n"
T975_1 = 12.706204736174698  # Student t, 0.975 quantile, 1 degree of freedom


# ---------------------------------------------------------------------------------------------------------------
# The paper's tables as space files
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["paper_tab3", "paper_tab4"])
def test_paper_table_spaces_are_cumulative_and_say_which_paper_row(name) -> None:
    space = load_space(resolve_space_path(name))
    base = space.base_config()
    assert next(iter(space.variants)) == "full" and set(space.labels) == set(space.variants)
    configs = [apply_overrides(base, trial_overrides(space, {VARIANT_KEY: v})) for v in space.variants]
    assert configs[0] == base  # the first row is RGNet as configured
    # cumulative: every row keeps the changes of the row above it and adds at least one
    bundles = list(space.variants.values())
    for above, below in itertools.pairwise(bundles):
        assert above.items() <= below.items() and len(below) > len(above)
    label = " ".join(space.labels.values())
    assert "Tab. 3" in label if name == "paper_tab3" else "Tab. 4" in label


def test_tab3_ends_at_the_disjoint_baseline_and_tab4_shares_full() -> None:
    tab3, tab4 = (load_space(resolve_space_path(n)) for n in ("paper_tab3", "paper_tab4"))
    ablations = load_space(resolve_space_path("ablations"))
    assert tab3.variants["disjoint_baseline"] == ablations.variants["disjoint_baseline"]
    last = apply_overrides(tab3.base_config(), trial_overrides(tab3, {VARIANT_KEY: "disjoint_baseline"}))
    assert (last.model.encoder, last.model.sampler.kind, last.model.retrieval) == ("plain", "none", "none")
    assert tab3.base_config() == tab4.base_config() and tab3.variants["full"] == tab4.variants["full"] == {}
    grounding_only = apply_overrides(
        tab4.base_config(), trial_overrides(tab4, {VARIANT_KEY: "wo_contrastive_sampling"})
    )
    assert (grounding_only.loss.contrastive_weight, grounding_only.loss.sampling_weight) == (0.0, 0.0)


def test_sweep_spaces_are_grids_with_the_asked_values(tmp_path) -> None:
    length = load_space(resolve_space_path("paper_length"))
    assert len(length.params["windows.length_sec"].values) >= 4 and set(length.variants) == {
        "rgnet",
        "disjoint_baseline",
    }
    assert length.num_grid_points() == 2 * len(length.params["windows.length_sec"].values)
    temperature = load_space(resolve_space_path("paper_temperature"))
    assert temperature.params["model.sampler.temperature"].values == (0.1, 0.3, 1.0, 3.0)
    # the study's copy: one seed is fixed, several seeds are one more grid key
    one = load_space(study.seeded_space(resolve_space_path("paper_temperature"), [0], tmp_path))
    assert one.num_grid_points() == 4 and one.base_config().train.seed == 0
    three = load_space(study.seeded_space(resolve_space_path("paper_length"), [0, 1, 2], tmp_path))
    assert three.num_grid_points() == 3 * length.num_grid_points()
    assert three.params["train.seed"].values == (0, 1, 2)


# ---------------------------------------------------------------------------------------------------------------
# Table arithmetic by hand
# ---------------------------------------------------------------------------------------------------------------
def _row(variant: str, seed: int, r1: float) -> dict:
    return {"variant": variant, "seed": seed, "test": {"R1@0.3": r1, "retrieval_R1": 50.0}}


def test_step_differences_pair_each_row_with_the_row_above_by_seed() -> None:
    rows = [_row("a", 0, 60.0), _row("a", 1, 70.0), _row("b", 1, 64.0), _row("b", 0, 52.0), _row("c", 0, 52.0)]
    rows.append(_row("c", 1, 66.0))
    steps = study.step_differences({"rows": rows}, ["a", "b", "c"])
    ab, bc = (s["metrics"]["R1@0.3"] for s in steps)
    assert (steps[0]["from"], steps[0]["to"]) == ("a", "b")
    assert ab["values"] == [-8.0, -6.0] and ab["mean"] == -7.0  # seed 0: 52-60, seed 1: 64-70
    half = T975_1 * math.sqrt(2.0) / math.sqrt(2)  # diffs -8, -6: s = sqrt(2)
    assert ab["low"] == pytest.approx(-7.0 - half) and ab["high"] == pytest.approx(-7.0 + half)
    assert bc["values"] == [0.0, 2.0]
    text = study.steps_markdown(steps, {"b": "w/o X"})
    assert "- a -> b (w/o X): retrieval_R1 undecided" in text and "R1@0.3 undecided" in text
    with pytest.raises(ValueError, match="different seeds"):
        study.step_differences({"rows": rows[:-1]}, ["a", "b", "c"])


def test_sweep_table_pairs_models_by_seed_at_each_value() -> None:
    def trial(model: str, x: float, seed: int, r1: float) -> dict:
        m = {"R1@0.3": r1, "retrieval_R1": 2 * r1}
        return {"model": model, "x": x, "seed": seed, "val": m, "test": m}

    trials = [
        trial("rgnet", 24.0, 1, 50.0),
        trial("rgnet", 24.0, 0, 40.0),
        trial("disjoint_baseline", 24.0, 0, 30.0),
        trial("disjoint_baseline", 24.0, 1, 44.0),
        trial("rgnet", 48.0, 0, 60.0),
        trial("rgnet", 48.0, 1, 60.0),
        trial("disjoint_baseline", 48.0, 0, 20.0),
        trial("disjoint_baseline", 48.0, 1, 20.0),
    ]
    text, data = study.sweep_table(trials, "length", "windows.length_sec", "length", [0, 1])
    assert data["models"] == ["rgnet", "disjoint_baseline"] and data["xs"] == [24.0, 48.0]
    cell = data["cells"]["rgnet/24"]["test"]["R1@0.3"]
    assert cell["seeds"] == [0, 1] and cell["values"] == [40.0, 50.0] and cell["mean"] == 45.0
    d24 = data["differences"]["24"]["R1@0.3"]
    assert d24["values"] == [10.0, 6.0] and d24["mean"] == 8.0  # seed 0: 40-30, seed 1: 50-44
    assert data["differences"]["48"]["R1@0.3"]["values"] == [40.0, 40.0]
    assert "| 48 |" in text and "**+40.0 [+40.0, +40.0]**" in text  # decided, bold
    assert "+8.0 [" in text and "**+8.0" not in text  # spread 4 over 2 seeds: undecided


# ---------------------------------------------------------------------------------------------------------------
# rgnet.eval.sweep
# ---------------------------------------------------------------------------------------------------------------
def test_topk_settings_and_decoded_windows() -> None:
    s = topk_settings([1, 5], oracle=True)
    assert (
        list(s) == ["k1", "k5", "oracle"]
        and s["k5"][0] == "eval.top_k_windows=5"
        and s["oracle"] == ["eval.oracle=true"]
    )
    with pytest.raises(ValueError, match=">= 1"):
        topk_settings([0])
    rows = [
        PredictionRow("a", "v", [], [[0.0, 1.0, 0.9]] * 3),  # a video with 3 windows
        PredictionRow("b", "v", [], [[0.0, 1.0, 0.9]] * 12),
    ]
    assert decoded_windows(rows, 5) == (3 + 5) / 2 and decoded_windows(rows, 30) == (3 + 12) / 2
    with pytest.raises(ValueError, match="no ranked windows"):
        decoded_windows([PredictionRow("c", "v", [], None)], 1)


def test_evaluate_settings_refuses_a_model_change(tmp_path) -> None:
    cfg = load_config("tiny", None, [f"data.root={tmp_path / 'data'}"])
    with pytest.raises(ConfigError, match="changes model"):
        evaluate_settings(torch.nn.Linear(1, 1), None, cfg, {"x": ["model.encoder=plain"]}, torch.device("cpu"))  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------------------------
# The evaluation studies and a table study end to end (tiny preset, 2 seeds, 1 epoch)
# ---------------------------------------------------------------------------------------------------------------
def _argv(tmp: Path, name: str, *extra: str) -> list[str]:
    return [name, *tiny_seeds_argv(tmp, *extra, epochs=1)]


@pytest.fixture(scope="module")
def topk(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("study")
    assert study.main(_argv(tmp, "topk")) == 0
    return tmp


@pytest.mark.slow  # the fixture trains RGNet and the baseline with 2 seeds (about 30 s), then evaluates 7 settings
def test_topk_sweep_equals_separate_rgnet_evaluate_runs(topk, tmp_path) -> None:
    tmp = topk
    out = tmp / "runs" / "paper_topk"
    data = json.loads((out / "study.json").read_text())
    assert [r["setting"] for r in data["rows"]] == ["k1", "k3", "k5", "k10", "k20", "k30", "oracle"]
    for model in ("full", "disjoint_baseline"):
        ckpt = tmp / "runs" / "paper_runs" / model / "seed1" / "best.pt"
        for k in (1, 3, 30):
            report = tmp_path / f"{model}-k{k}.json"
            argv = ["--checkpoint", str(ckpt), "--split", "test", f"eval.top_k_windows={k}"]
            assert evaluate.main([*argv, "--out", str(report)]) == 0
            assert data["runs"][model]["1"][f"k{k}"]["metrics"] == json.loads(report.read_text())["metrics"]
        report = tmp_path / f"{model}-oracle.json"
        argv = ["--checkpoint", str(ckpt), "--split", "test", "eval.oracle=true", "--out", str(report)]
        assert evaluate.main(argv) == 0
        assert data["runs"][model]["1"]["oracle"]["metrics"] == json.loads(report.read_text())["metrics"]
    # k is capped by each video's windows: the tiny videos have fewer than 20, so k20 and k30 decode the same
    dec = {r["setting"]: r["decoded_windows"]["full"] for r in data["rows"]}
    assert dec["k1"] == 1.0 and dec["k3"] == 3.0 and dec["k20"] == dec["k30"] < 20
    assert data["runs"]["full"]["0"]["k20"]["metrics"] == data["runs"]["full"]["0"]["k30"]["metrics"]
    row = next(r for r in data["rows"] if r["setting"] == "k3")
    values = [data["runs"]["full"][s]["k3"]["metrics"]["R1@0.3"] for s in ("0", "1")]
    assert row["full/R1@0.3"]["values"] == values
    base = [data["runs"]["disjoint_baseline"][s]["k3"]["metrics"]["R1@0.3"] for s in ("0", "1")]
    assert row["difference/R1@0.3"]["values"] == [a - b for a, b in zip(values, base, strict=True)]
    md = (out / "study.md").read_text()
    assert "| oracle (the GT window only) |" in md and "RGNet - baseline R1@0.3" in md
    assert (out / "study.png").read_bytes()[:8] == PNG


@pytest.mark.slow
def test_oracle_and_tab4_reuse_the_runs_of_tab3(topk) -> None:
    tmp = topk
    runs = tmp / "runs" / "paper_runs"
    stamps = {p: p.stat().st_mtime_ns for p in runs.glob("*/seed*/best.pt")}
    assert len(stamps) == 4  # RGNet and the baseline, 2 seeds
    assert study.main(_argv(tmp, "oracle")) == 0
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # evaluation only
    data = json.loads((tmp / "runs" / "paper_oracle" / "study.json").read_text())
    diff = data["differences"]["RGNet: oracle - two-stage"]["R1@0.3"]
    oracle = data["cells"]["full/oracle"]["R1@0.3"]["values"]
    two_stage = data["cells"]["full/k3"]["R1@0.3"]["values"]  # the tiny preset decodes 3 windows
    assert diff["values"] == [a - b for a, b in zip(oracle, two_stage, strict=True)]
    md = (tmp / "runs" / "paper_oracle" / "study.md").read_text()
    assert "| RGNet | oracle (GT window) |" in md and "| baseline | two-stage, top 3 |" in md
    # tab4 shares `full` with tab3 (same config): only its two other rows are trained
    assert study.main(_argv(tmp, "tab4")) == 0
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    table = json.loads((tmp / "runs" / "paper_tab4" / "ablation.json").read_text())
    assert sorted(table["trained_now"]) == [
        f"{v}-seed{s}" for v in ("wo_contrastive", "wo_contrastive_sampling") for s in (0, 1)
    ]
    md = (tmp / "runs" / "paper_tab4" / "study.md").read_text()
    assert "Tab. 4 'w/o Contrastive loss'" in md and "| full -> wo_contrastive |" in md
    assert (tmp / "runs" / "paper_tab4" / "study.png").read_bytes()[:8] == PNG
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}")
    exp = client.get_experiment_by_name("rgnet")
    (parent,) = client.search_runs([exp.experiment_id], filter_string="attributes.run_name = 'ablate-paper_tab4'")
    assert {f.path for f in client.list_artifacts(parent.info.run_id, "study")} == {
        "study/study.md",
        "study/study.json",
    }


# ---------------------------------------------------------------------------------------------------------------
# A Tune study end to end
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(1800)  # 4 Ray Train trials; minutes each on a loaded 2-core machine
def test_temperature_study_runs_a_tune_grid_and_evaluates_each_trial(tmp_path) -> None:
    argv = [
        "temperature",
        "--preset",
        "tiny",
        f"data.root={tmp_path / 'data'}",
        f"train.output_dir={tmp_path / 'runs'}",
        f"ray.storage_path={tmp_path / 'ray_results'}",
        f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
        "train.epochs=1",
        "ray.num_workers=1",
    ]
    assert study.main(argv) == 0
    out = tmp_path / "runs" / "paper_temperature"
    data = json.loads((out / "study.json").read_text())
    assert sorted(t["x"] for t in data["trials"]) == [0.1, 0.3, 1.0, 3.0]
    assert {t["seed"] for t in data["trials"]} == {0} and data["models"] == ["rgnet"]
    for t in data["trials"]:  # each trial's best checkpoint, evaluated as `rgnet evaluate` does
        assert Path(t["checkpoint"]).exists() and t["best_epoch"] == 1
        assert evaluate_checkpoint(checkpoint=t["checkpoint"], split="test")["metrics"] == t["test"]
    md = (out / "study.md").read_text()
    assert "`model.sampler.temperature` swept with rgnet tune" in md and "| 3 |" in md
    assert (out / "study.png").read_bytes()[:8] == PNG
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("rgnet")
    (parent,) = client.search_runs([exp.experiment_id], filter_string="attributes.run_name = 'sweep-paper_temperature'")
    files = {f.path for f in client.list_artifacts(parent.info.run_id, "study")}
    assert files == {"study/study.md", "study/study.png", "study/study.json"}
    # the trials' models are the sweep's: the checkpoints hold the swept temperature
    temps = sorted(
        torch.load(t["checkpoint"], weights_only=True)["config"]["model"]["sampler"]["temperature"]
        for t in data["trials"]
    )
    assert temps == [0.1, 0.3, 1.0, 3.0]

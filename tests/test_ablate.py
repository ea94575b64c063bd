"""``rgnet ablate``: the ablation table from local child runs, on the tiny preset (no Ray)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pipelines import ablate
from pipelines.tracking import metric_key
from rgnet.config import load_config
from rgnet.data.dataset import open_split
from rgnet.model import build_model
from rgnet.train.loop import evaluate_model, seed_everything

PNG = b"\x89PNG\r\n\x1a\n"


def args(tmp: Path, *extra: str) -> list[str]:
    return [
        "--preset",
        "tiny",
        "--variants",
        "full,no_contrastive",
        "--name",
        "t",
        "--parallel",
        "2",
        *extra,
        f"data.root={tmp / 'data'}",
        f"train.output_dir={tmp / 'runs'}",
        "train.epochs=2",
        f"tracking.uri=sqlite:///{tmp / 'mlflow.db'}",
    ]


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ablate")
    assert ablate.main(args(tmp)) == 0
    return tmp, tmp / "runs" / "t"


@pytest.mark.slow  # the `table` fixture trains two variants for about 9 s
def test_table_rows_files_and_variant_configs(table) -> None:
    _, out = table
    data = json.loads((out / "ablation.json").read_text())
    assert [r["variant"] for r in data["rows"]] == ["untrained", "full", "no_contrastive"]
    for row in data["rows"]:
        for split in ("val", "test"):
            assert {"retrieval_R1", "R1@0.3", "mIoU"} <= set(row[split])
    assert [r["epochs"] for r in data["rows"][1:]] == [2, 2]
    assert data["changes"]["no_contrastive"] == {"loss.contrastive_weight": 0.0}
    # each child trained the variant's config, not the base one
    full = load_config(config_file=out / "full" / "config.yaml")
    ablated = load_config(config_file=out / "no_contrastive" / "config.yaml")
    assert full.loss.contrastive_weight == 1.0 and ablated.loss.contrastive_weight == 0.0
    assert full.train.epochs == ablated.train.epochs == 2 and full.model == ablated.model
    # the table's test column is the child's own test report
    report = json.loads((out / "no_contrastive" / "report_test.json").read_text())
    assert data["rows"][2]["test"] == report["metrics"]
    md = (out / "ablation.md").read_text().splitlines()
    assert len(md) == 2 + 3 and md[2].startswith("| untrained |") and "loss.contrastive_weight=0.0" in md[4]
    assert (out / "ablation.png").read_bytes()[:8] == PNG


@pytest.mark.slow
def test_untrained_row_is_the_seeded_initial_model(table) -> None:
    _, out = table
    cfg = load_config(config_file=out / "full" / "config.yaml")
    seed_everything(cfg.train.seed)
    model = build_model(cfg.model, cfg.data.video_dim, cfg.data.text_dim)
    report, _ = evaluate_model(model, open_split(cfg.data, cfg.data.test_split), cfg, torch.device("cpu"))
    row = json.loads((out / "ablation.json").read_text())["rows"][0]
    assert row["variant"] == "untrained" and row["test"] == report["metrics"]


@pytest.mark.slow
def test_rerun_reuses_finished_variants_and_refuses_a_changed_config(table, capsys) -> None:
    tmp, out = table
    best = out / "full" / "best.pt"
    stamp = best.stat().st_mtime_ns
    assert ablate.main(args(tmp)) == 0
    assert best.stat().st_mtime_ns == stamp  # not trained again
    capsys.readouterr()
    assert ablate.main([*args(tmp), "train.epochs=3"]) == 2
    assert "holds a run with another config" in capsys.readouterr().err
    assert best.stat().st_mtime_ns == stamp  # nothing overwritten


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--variants", "full,no_such"], "unknown variant(s) no_such"),
        (["--space", "smoke"], "has no variants"),
        (["--parallel", "0"], "--parallel must be >= 1"),
        (["--space", "nowhere"], "search space 'nowhere' not found"),
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

    def runs() -> tuple[object, dict[str, object]]:
        exp = client.get_experiment_by_name("rgnet")
        assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
        found = client.search_runs([exp.experiment_id], filter_string="tags.`rgnet.ablation` = 't'")
        (parent,) = [r for r in found if "mlflow.parentRunId" not in r.data.tags]
        kids = {r.data.tags["rgnet.variant"]: r for r in found if r.data.tags.get("mlflow.parentRunId")}
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
    assert set(kids) == {row["variant"] for row in data["rows"]} == {"untrained", "full", "no_contrastive"}
    seed = load_config(config_file=out / "full" / "config.yaml").train.seed
    for row in data["rows"]:
        run = kids[row["variant"]]
        assert run.info.status == "FINISHED" and run.info.run_name == f"{row['variant']}-seed{seed}"
        assert run.data.tags["rgnet.seed"] == str(seed)
        for split in ("val", "test"):
            for name, value in row[split].items():
                assert run.data.metrics[metric_key(f"final_{split}/{name}")] == pytest.approx(value), (split, name)
        contexts = sorted(d.tags[0].value for d in run.inputs.dataset_inputs)
        assert contexts == ["test", "train", "val"]
    assert kids["no_contrastive"].data.params["loss.contrastive_weight"] == "0.0"
    assert kids["full"].data.params["loss.contrastive_weight"] == "1.0"
    # the per-epoch curves, under the names a distributed rgnet train run logs, each epoch once
    rid = kids["full"].info.run_id
    for key in ("epoch", "train/loss", "val/R1_at_0.3", "val/retrieval_R1"):
        assert sorted(int(m.step) for m in client.get_metric_history(rid, key)) == [1, 2], key
    assert client.get_metric_history(kids["untrained"].info.run_id, "epoch") == []

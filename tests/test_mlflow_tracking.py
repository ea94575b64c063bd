"""MLflow as a researcher reads it: the experiment's kind, the best model as an MLflow model that predicts what
``rgnet predict`` prints, dataset inputs with honest digests, MLflow's source tags, and the status of a sweep's trial
runs.  The model is logged to a real ``mlflow server`` on loopback (the server proxies the logged model's files); the
rest uses a SQLite store, where a server adds nothing.  No Ray cluster is started."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import h5py
import numpy as np
import pytest
import torch
from helpers import save_tiny_checkpoint

from pipelines import mlflow_model, runtime, tracking
from pipelines import predict as predict_cli
from pipelines.runtime import resolve_paths
from rgnet.config import Config, from_dict, load_config, save_yaml
from rgnet.data.dataset import open_split
from rgnet.train.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parent.parent
VIDEO, QUERY = "videos/syn-v0016", "queries/syn-a0016_0"


def tiny_cfg(tmp: Path, uri: str = "", *extra: str) -> Config:
    store = uri or f"sqlite:///{tmp / 'mlflow.db'}"
    overrides = [f"data.root={tmp / 'data'}", f"train.output_dir={tmp / 'runs'}", f"tracking.uri={store}"]
    return resolve_paths(load_config("tiny", overrides=[*overrides, "train.progress=false", *extra]))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """The tiny preset's data and a seeded tiny model saved as a checkpoint (epoch 3) with its config.yaml."""
    tmp = tmp_path_factory.mktemp("mlflow_tiny")
    cfg = tiny_cfg(tmp)
    ckpt = save_tiny_checkpoint(cfg, tmp / "best.pt", epoch=3, global_step=30)
    save_yaml(cfg, tmp / "config.yaml")
    return tmp, ckpt, tmp / "config.yaml"


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One SQLite store for the module's tests (creating one runs MLflow's migrations: seconds); each test uses its
    own experiment or run keys."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow_store') / 'mlflow.db'}"
    MlflowClient(uri).search_experiments()  # creates the tables now
    return uri


def moments_of(frame: Any, index: int = 0) -> np.ndarray:
    rows = frame[frame["query_index"] == index].sort_values("rank")
    assert list(rows["rank"]) == list(range(1, len(rows) + 1))
    return rows[["start_sec", "end_sec", "score"]].to_numpy()


# ---------------------------------------------------------------------------------------------------------------
# The experiment
# ---------------------------------------------------------------------------------------------------------------
def test_experiments_are_tagged_as_model_training(tmp_path: Path, store: str) -> None:
    from mlflow import MlflowClient

    uri = store
    handle = tracking.open_run(tiny_cfg(tmp_path, uri, "tracking.experiment=kind"), run_key="a")
    client = MlflowClient(uri)
    assert client.get_experiment(handle.experiment_id).tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"
    # an experiment created before (no kind) gets the tag; a kind a user chose in the UI is kept
    old = client.create_experiment("old")
    chosen = client.create_experiment("chosen", tags={tracking.EXPERIMENT_KIND_TAG: "genai_development"})
    for name in ("old", "chosen"):
        tracking.open_run(tiny_cfg(tmp_path, uri, f"tracking.experiment={name}"), run_key=name)
    assert client.get_experiment(old).tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"
    assert client.get_experiment(chosen).tags[tracking.EXPERIMENT_KIND_TAG] == "genai_development"
    # the links printed for a run open MLflow 3.17's model-training view
    url = tracking.run_url(uri, handle.experiment_id, handle.run_id)
    assert url == f"http://127.0.0.1:5000/#/experiments/{handle.experiment_id}/runs/{handle.run_id}" + (
        "?workflowType=machine_learning"
    )
    assert tracking.run_url("http://head:5000/", "7").startswith("http://head:5000/#/experiments/7?")


# ---------------------------------------------------------------------------------------------------------------
# The logged model
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_logged_model_predicts_what_rgnet_predict_prints(
    tiny: tuple[Path, Path, Path], mlflow_server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    import mlflow.pyfunc
    from mlflow import MlflowClient
    from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS

    data_tmp, ckpt, config_yaml = tiny
    monkeypatch.chdir(tmp_path)  # MLflow's process-wide default store would be ./mlflow.db: nothing may use it
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = tiny_cfg(data_tmp, mlflow_server)
    handle = tracking.open_run(cfg, run_key=f"model:{tmp_path}")
    model_id = mlflow_model.log_best_model(handle, ckpt, config_yaml, best_epoch=3)
    registered = tracking.register_model(handle, "rgnet-test", model_id, 3)
    assert registered is not None and registered.startswith("models:/rgnet-test/")
    tracking.finish(handle, "FINISHED")

    # linked: the run's output, the model's source run and epoch, the version's model and run, both ways
    client = MlflowClient(mlflow_server)
    run = client.get_run(handle.run_id)
    assert [(o.model_id, o.step) for o in run.outputs.model_outputs] == [(model_id, 3)]
    logged = client.get_logged_model(model_id)
    assert logged.name == "model" and logged.source_run_id == handle.run_id and str(logged.status) == "READY"
    assert logged.tags[mlflow_model.BEST_EPOCH_TAG] == "3"
    files = {f.path for f in client.list_logged_model_artifacts(model_id, "artifacts")}
    assert files == {"artifacts/checkpoint.pt", "artifacts/config.yaml"}
    version = client.get_model_version("rgnet-test", registered.rsplit("/", 1)[1])
    assert version.run_id == handle.run_id and version.source == logged.artifact_location
    versions = json.loads(client.get_logged_model(model_id).tags[MLFLOW_MODEL_VERSIONS])
    assert [(v["name"], str(v["version"])) for v in versions] == [("rgnet-test", version.version)]
    # a resumed run whose best did not change logs and registers nothing new
    assert mlflow_model.log_best_model(handle, ckpt, config_yaml, best_epoch=3) == model_id
    assert tracking.register_model(handle, "rgnet-test", model_id, 3) == registered

    # `rgnet predict --checkpoint` on one query
    features = data_tmp / "data" / "features.h5"
    out = tmp_path / "answer.json"
    argv = ["--checkpoint", str(ckpt), "--video", f"{features}:{VIDEO}", "--query-features", f"{features}:{QUERY}"]
    assert predict_cli.main([*argv, "--top", "5", "--json", str(out)]) == 0
    expected = np.array([[m["start_sec"], m["end_sec"], m["score"]] for m in json.loads(out.read_text())["moments"]])
    assert len(expected) >= 2

    # `rgnet evaluate --model-uri` and `rgnet predict --model-uri` read the same checkpoint back, from the store
    # they are given (no process-wide MLflow URI is set yet)
    weights = load_checkpoint(ckpt)["model"]
    for uri in (registered, f"runs:/{handle.run_id}/model", f"models:/{model_id}"):
        payload = runtime.load_model_uri(uri, mlflow_server)
        assert payload["epoch"] == 3 and all(torch.equal(payload["model"][k], v) for k, v in weights.items()), uri
    out2 = tmp_path / "answer2.json"
    argv2 = ["--model-uri", registered, "--tracking-uri", mlflow_server, *argv[2:], "--top", "5", "--json", str(out2)]
    assert predict_cli.main(argv2) == 0
    assert json.loads(out2.read_text())["moments"] == json.loads(out.read_text())["moments"]
    assert not (tmp_path / "mlflow.db").exists()

    # the registered version, loaded by MLflow (its API resolves models:/ in the process-wide store): file
    # references, arrays, several queries
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    model = mlflow.pyfunc.load_model(registered)
    got = model.predict({"video": f"{features}:{VIDEO}", "query_features": f"{features}:{QUERY}", "top": 5})
    assert list(got.columns) == mlflow_model.OUTPUT_COLUMNS
    np.testing.assert_allclose(moments_of(got), expected, rtol=1e-6, atol=1e-9)
    with h5py.File(features, "r") as f:
        video, tokens = f[VIDEO][()], f[QUERY][()]
    two = model.predict(
        [
            {"video": video, "query_features": tokens, "fps": 2.0, "top": 5},
            {"video": f"{features}:{VIDEO}", "query_features": f"{features}:{QUERY}", "top": 2},
        ]
    )
    np.testing.assert_allclose(moments_of(two, 0), expected, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(moments_of(two, 1), expected[:2], rtol=1e-6, atol=1e-9)
    # the run's model URI resolves to the same logged model
    by_run = mlflow.pyfunc.load_model(f"runs:/{handle.run_id}/model")
    assert by_run.metadata.model_id == model_id
    # a bad query names its position and the field
    with pytest.raises(ValueError, match=r"query 1: the field 'video' is required"):
        model.predict([{"video": f"{features}:{VIDEO}", "query_features": f"{features}:{QUERY}"}, {"query": "x"}])
    with pytest.raises(ValueError, match=r"query 0: unknown field\(s\) \['qurey'\]"):
        model.predict({"video": f"{features}:{VIDEO}", "qurey": "x"})
    capsys.readouterr()


def test_runs_logged_before_the_mlflow_model_still_load(
    tiny: tuple[Path, Path, Path], tmp_path: Path, store: str
) -> None:
    """The earlier layout: the checkpoint folder as run artifacts (``model/``, ``models/epoch_<k>/``) and a registry
    version pointing at the folder."""
    from mlflow import MlflowClient

    data_tmp, ckpt, config_yaml = tiny
    uri = store
    handle = tracking.open_run(tiny_cfg(data_tmp, uri, "tracking.experiment=old-layout"), run_key="old")
    folder = tmp_path / "model"
    folder.mkdir()
    shutil.copyfile(ckpt, folder / "checkpoint.pt")
    shutil.copyfile(config_yaml, folder / "config.yaml")
    client = MlflowClient(uri)
    client.log_artifacts(handle.run_id, str(folder), "model")
    client.log_artifacts(handle.run_id, str(folder), "models/epoch_3")
    client.create_registered_model("old-layout")
    client.create_model_version("old-layout", f"runs:/{handle.run_id}/models/epoch_3", run_id=handle.run_id)
    for model_uri in (f"runs:/{handle.run_id}/model", "models:/old-layout/1"):
        assert runtime.load_model_uri(model_uri, uri)["epoch"] == 3
    with pytest.raises(FileNotFoundError, match="holds no rgnet checkpoint"):
        runtime.load_model_uri(f"runs:/{handle.run_id}/models", uri)


# ---------------------------------------------------------------------------------------------------------------
# Datasets and source tags
# ---------------------------------------------------------------------------------------------------------------
def test_datasets_and_source_tags(tiny: tuple[Path, Path, Path], tmp_path: Path, store: str) -> None:
    from mlflow import MlflowClient

    data_tmp, _, _ = tiny
    uri = store
    cfg = tiny_cfg(data_tmp, uri, "tracking.experiment=datasets")
    handle = tracking.open_run(cfg, run_key="datasets", command="rgnet train")
    splits = {name: open_split(cfg.data, name) for name in ("train", "val", "test")}
    tracking.log_datasets(handle, splits)
    tracking.log_datasets(handle, splits)  # a resumed run: nothing new
    run = MlflowClient(uri).get_run(handle.run_id)
    inputs = {d.tags[0].value: d.dataset for d in run.inputs.dataset_inputs}
    assert len(run.inputs.dataset_inputs) == 3 and set(inputs) == {"train", "val", "test"}
    for context, split in splits.items():
        ds = inputs[context]
        assert ds.name == f"data/{context}" and ds.source_type == "local"
        assert json.loads(ds.source) == {"uri": str(split.annotation_path)}
        assert ds.digest == tracking.split_digest(split)[0] == handle.datasets[context][1]
        profile = json.loads(ds.profile)
        assert profile["num_rows"] == len(split.records) > 0
        assert profile["num_videos"] == len({r.video_key for r in split.records})
        assert str(data_tmp / "data" / "features.h5") in profile["files"]
    assert len({d.digest for d in inputs.values()}) == 3  # the splits differ in their annotations

    # MLflow's standard source tags, no private duplicates
    tags = run.data.tags
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    assert tags["mlflow.source.name"] == "rgnet train" and tags["mlflow.source.type"] == "LOCAL"
    assert tags["mlflow.source.git.commit"] == head and tags["mlflow.source.git.dirty"] in ("true", "false")
    assert "git_commit" not in tags and "dataset" not in tags and tags["mlflow.user"]

    # the digest follows the content, not the path
    copy = tmp_path / "copy"
    shutil.copytree(data_tmp / "data", copy / "data")
    copied = from_dict({"data": {"root": str(copy / "data")}}, cfg).data

    def digest(split: str = "train") -> str:
        return tracking.split_digest(open_split(copied, split))[0]

    assert digest() == handle.datasets["train"][1]
    lines = (copy / "data" / "train.jsonl").read_text().splitlines()
    record = json.loads(lines[0])
    record["query"] += " again"
    (copy / "data" / "train.jsonl").write_text("\n".join([json.dumps(record), *lines[1:]]) + "\n")
    changed = digest()
    assert changed != handle.datasets["train"][1]
    with h5py.File(copy / "data" / "features.h5", "a") as f:  # another feature array: the file's size changes
        f.create_dataset("extra", data=np.zeros((64, 64), np.float32))
    assert digest() != changed


# ---------------------------------------------------------------------------------------------------------------
# Sweeps: the status of each trial's run
# ---------------------------------------------------------------------------------------------------------------
def test_trial_outcome_rule() -> None:
    assert tracking.trial_outcome(None, 2, 2) == ("FINISHED", {})
    assert tracking.trial_outcome(None, 3, 2) == ("FINISHED", {})
    assert tracking.trial_outcome(None, 1, 2) == ("KILLED", {"rgnet.stopped_early": "true"})
    assert tracking.trial_outcome(None, 0, 2) == ("KILLED", {})  # ended without a result: not ASHA's doing
    assert tracking.trial_outcome("ValueError: boom", 2, 2) == ("FAILED", {"rgnet.error": "ValueError: boom"})


def fake_trial(trial_id: str, epoch: int, error: str | None = None, **config: Any) -> Any:
    return SimpleNamespace(
        trial_id=trial_id,
        last_result={"epoch": epoch, "training_iteration": epoch, "trial_id": trial_id},
        config=config,
        get_error=lambda: None if error is None else RuntimeError(error),
    )


def test_trial_runs_get_tunes_verdict(tmp_path: Path, store: str) -> None:
    """The callback in the sweep driver marks each trial's child run from Tune's account of the trial: completed,
    stopped early by ASHA, or errored; an interrupted sweep leaves its running trials KILLED until restored."""
    from mlflow import MlflowClient

    uri = store
    cfg = tiny_cfg(tmp_path, uri, "tracking.experiment=sweep")
    parent = tracking.open_run(cfg, run_key="sweep", command="rgnet tune")
    runs = {}
    for trial in ("done", "stopped", "broken", "late", "running", "restored"):
        tags = {"mlflow.parentRunId": parent.run_id, "rgnet.trial_id": trial}
        runs[trial] = tracking.open_run(cfg, run_key=f"trial-{trial}", tags=tags, command="rgnet tune").run_id
    client = MlflowClient(uri)
    client.set_terminated(runs["done"], "FAILED")  # what the trial itself wrote in the old race: overruled
    client.set_tag(runs["restored"], "rgnet.stopped_early", "true")  # marked before a restore, then finished

    callback = pickle.loads(pickle.dumps(tracking.TrialRunStatus(uri, parent.experiment_id, parent.run_id, 2)))
    callback.on_trial_complete(0, [], fake_trial("done", 2))
    callback.on_trial_complete(0, [], fake_trial("stopped", 1))
    callback.on_trial_error(0, [], fake_trial("broken", 1, error="Traceback ...\nValueError: bad batch"))
    callback.on_trial_complete(0, [], fake_trial("late", 2, **{"train.epochs": 3}))  # a space that sweeps epochs
    callback.on_trial_complete(0, [], fake_trial("restored", 2))
    callback.on_trial_complete(0, [], fake_trial("never-opened-a-run", 2))  # nothing to mark, no error

    def state(trial: str) -> tuple[str, str | None, str | None]:
        run = client.get_run(runs[trial])
        return run.info.status, run.data.tags.get("rgnet.stopped_early"), run.data.tags.get("rgnet.error")

    assert state("done") == ("FINISHED", None, None)
    assert state("stopped") == ("KILLED", "true", None)
    assert state("broken") == ("FAILED", None, "Traceback ...\nValueError: bad batch")
    error_txt = client.download_artifacts(runs["broken"], "error.txt", str(tmp_path))
    assert Path(error_txt).read_text().endswith("ValueError: bad batch")
    assert state("late") == ("KILLED", "true", None)
    assert state("restored") == ("FINISHED", None, None)

    assert tracking.mark_unfinished_children(parent) == 1  # only the one still RUNNING
    assert state("running") == ("KILLED", None, None)
    assert state("done") == ("FINISHED", None, None)


def test_tune_loggers_are_off_unless_asked_for(monkeypatch: pytest.MonkeyPatch) -> None:
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback, TBXLoggerCallback
    from ray.tune.utils.callback import _create_default_callbacks

    from pipelines.sweep import no_default_loggers, tune_loggers

    kinds = [type(c) for c in tune_loggers("json")]
    assert kinds == [JsonLoggerCallback]  # the default: the summary reads result.json
    assert [type(c) for c in tune_loggers("csv, tensorboard")] == [
        JsonLoggerCallback,
        CSVLoggerCallback,
        TBXLoggerCallback,
    ]
    with pytest.raises(ValueError, match="unknown logger"):
        tune_loggers("json,tensorbord")
    # Tune itself adds no logger while the sweep runs, and the variable is restored afterwards
    monkeypatch.delenv("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", raising=False)
    with no_default_loggers():
        made = _create_default_callbacks(tune_loggers("json"), metric="m", mode="min")
    assert not any(isinstance(c, (CSVLoggerCallback, TBXLoggerCallback)) for c in made)
    assert sum(isinstance(c, JsonLoggerCallback) for c in made) == 1
    assert "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS" not in os.environ
    assert any(isinstance(c, TBXLoggerCallback) for c in _create_default_callbacks([], metric="m", mode="min"))

"""The best model of an ``rgnet train`` run as an MLflow model (MLflow 3 logged model, ``python_function`` flavour).

What is logged: a pyfunc model named ``model``, linked to its run (``runs:/<run id>/model`` resolves to it, the run's
Models column and the experiment's Models tab show it), carrying the best checkpoint and its config as artifacts
(``artifacts/checkpoint.pt``, ``artifacts/config.yaml``), tagged with its epoch, and registered from there as a
version of ``<experiment>-<run name>`` (:func:`pipelines.tracking.register_model`).  Its validation and test metrics
are linked to it and to the datasets they were measured on.

What a user can do with it::

    import mlflow
    model = mlflow.pyfunc.load_model("models:/rgnet-tiny/1")          # or runs:/<run id>/model, models:/<model id>
    moments = model.predict({"video": "data/tiny/features.h5:videos/syn-v0016",
                             "query_features": "data/tiny/features.h5:queries/syn-a0016_0", "top": 5})

**Input** (``model_input`` of ``predict``): one query as a dict, several as a list of dicts or a pandas DataFrame
with one row per query; the fields are those of ``rgnet predict --video``:

=====================  ========================================================================================
``video``              required: ``"PATH[:KEY]"`` of a feature file (.h5 / .pt / .npy, as ``--video``) or the
                       (T, video_dim) array itself
``query``              the sentence; enough on its own for a model trained with ``data.text_encoder``
``query_features``     ``"PATH[:KEY]"`` or the (L, text_dim) array of the query's token features (required for a
                       model without a text encoder)
``sentence_features``  ``"PATH[:KEY]"`` or the (video_dim,) / (1, video_dim) sentence feature, for frozen-feature
                       ranking models (``model.retrieval=none``, ``eval.fusion=matching``)
``fps``                feature rate (default: the file's ``fps`` attribute, else the model's training rate)
``top``                moments per query (default 10)
=====================  ========================================================================================

**Output**: a pandas DataFrame, one row per moment, ordered by query then rank: ``query_index`` (the query's position
in the input), ``rank`` (1 = best), ``start_sec``, ``end_sec``, ``score`` -- exactly the moments ``rgnet predict
--checkpoint`` prints for the same inputs (both run :func:`rgnet.predict.ground_query`).

No MLflow signature is stored: the inputs are file references or arrays of any length, which MLflow's column schemas
cannot describe without copying whole videos; the fields are checked here instead, and a bad one is an error naming
the query's position and the field.  Loading the model needs this project installed (``pip install -e .``), like
``rgnet predict``: the model is "models from code" (:mod:`pipelines.mlflow_pyfunc_entry`), nothing is pickled.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import pandas as pd

log = logging.getLogger("rgnet.mlflow_model")

MODEL_NAME = "model"  # the logged model's name: runs:/<run id>/model resolves to the run's newest model of this name
CHECKPOINT_ARTIFACT = "checkpoint"  # keys of the pyfunc's artifacts
CONFIG_ARTIFACT = "config"
BEST_EPOCH_TAG = "rgnet.best_epoch"
OUTPUT_COLUMNS = ["query_index", "rank", "start_sec", "end_sec", "score"]
INPUT_FIELDS = ("video", "query", "query_features", "sentence_features", "fps", "top")
DEFAULT_TOP = 10
ENTRY_FILE = Path(__file__).with_name("mlflow_pyfunc_entry.py")


# ---------------------------------------------------------------------------------------------------------------
# The pyfunc
# ---------------------------------------------------------------------------------------------------------------
def _given(value: Any) -> bool:
    """A field counts as given unless it is absent, None or a DataFrame's NaN filler."""
    return value is not None and not (isinstance(value, float) and math.isnan(value))


def query_rows(model_input: Any) -> list[dict[str, Any]]:
    """The model input as one dict per query (a dict, a list of dicts, or a DataFrame with a row per query)."""
    if isinstance(model_input, pd.DataFrame):
        rows = model_input.to_dict("records")
    elif isinstance(model_input, dict):
        rows = [model_input]
    elif isinstance(model_input, list | tuple) and all(isinstance(r, dict) for r in model_input):
        rows = list(model_input)
    else:
        raise ValueError(
            f"model input is a {type(model_input).__name__}: give a dict (one query), a list of dicts or a pandas "
            f"DataFrame (one row per query) with the fields {', '.join(INPUT_FIELDS)}"
        )
    if not rows:
        raise ValueError("model input holds no query")
    out = []
    for i, row in enumerate(rows):
        unknown = sorted(str(k) for k in row if k not in INPUT_FIELDS)
        if unknown:
            raise ValueError(
                f"model input query {i}: unknown field(s) {unknown} (the fields: {', '.join(INPUT_FIELDS)})"
            )
        out.append({k: v for k, v in row.items() if _given(v)})
    return out


class RGNetPyfunc(mlflow.pyfunc.PythonModel):
    """RGNet's two-stage inference (window retrieval, then grounding) behind MLflow's pyfunc interface."""

    def load_context(self, context: Any) -> None:
        from rgnet.train.checkpoint import load_checkpoint, model_from_payload
        from rgnet.train.loop import resolve_device

        payload = load_checkpoint(context.artifacts[CHECKPOINT_ARTIFACT])
        model, self.config = model_from_payload(payload)
        self.epoch = int(payload["epoch"])
        self.device = resolve_device(self.config.train.device)
        self.model = model.to(self.device).eval()

    # The model_input annotation is pandas.DataFrame because MLflow then passes any input through unconverted (it
    # infers no schema from it); dicts and lists of dicts are accepted as well (module docstring).
    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        from rgnet.predict import ground_query

        out: list[tuple[int, int, float, float, float]] = []
        for i, row in enumerate(query_rows(model_input)):
            try:
                top = int(row.get("top", DEFAULT_TOP))
                if top < 1:
                    raise ValueError(f"'top' must be >= 1, got {top}")
                if "video" not in row:
                    raise ValueError("the field 'video' is required (a feature file PATH[:KEY] or a (T, D) array)")
                if "query_features" not in row and not str(row.get("query", "")).strip():
                    raise ValueError("give 'query' (the sentence) or 'query_features' (its token features)")
                answer = ground_query(
                    self.model,
                    self.config,
                    video=row["video"],
                    query=row.get("query"),
                    query_features=row.get("query_features"),
                    sentence_features=row.get("sentence_features"),
                    fps=float(row["fps"]) if "fps" in row else None,
                    top=top,
                    device=self.device,
                )
            except ValueError as e:  # DataError and the text encoder's errors included
                raise ValueError(f"model input query {i}: {e}") from e
            out += [(i, rank, s, e, p) for rank, (s, e, p) in enumerate(answer.moments, 1)]
        return pd.DataFrame(out, columns=OUTPUT_COLUMNS)


# ---------------------------------------------------------------------------------------------------------------
# Logging (driver side, through an MlflowClient bound to the run's store: no process-wide MLflow state is changed)
# ---------------------------------------------------------------------------------------------------------------
@contextmanager
def _quiet_save() -> Iterator[None]:
    """save_model warns that no signature could be inferred (the module docstring says why there is none) and draws a
    progress bar for each artifact it copies into the model; neither tells the user anything."""
    logger = logging.getLogger("mlflow.pyfunc")
    level, bar = logger.level, os.environ.get("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
    logger.setLevel(logging.ERROR)
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    try:
        yield
    finally:
        logger.setLevel(level)
        if bar is None:
            del os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"]
        else:
            os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = bar


def pip_requirements() -> list[str]:
    import mlflow
    import torch

    return [
        "rgnet-ray",  # this project: pip install -e <checkout>
        f"torch=={torch.__version__.split('+')[0]}",
        f"mlflow=={mlflow.__version__}",
        "numpy",
        "pandas",
        "h5py",
        "pyyaml",
    ]


def find_logged_model(client: Any, experiment_id: str, run_id: str, best_epoch: int) -> Any | None:
    """The READY model this run already logged for ``best_epoch`` (a resumed run whose best did not change)."""
    from mlflow.entities import LoggedModelStatus

    page_token = None
    while True:
        page = client.search_logged_models(
            [experiment_id], filter_string=f"name = '{MODEL_NAME}'", page_token=page_token
        )
        for m in page:
            if (
                m.source_run_id == run_id
                and m.tags.get(BEST_EPOCH_TAG) == str(best_epoch)
                and m.status == LoggedModelStatus.READY
            ):
                return m
        if not page.token:
            return None
        page_token = page.token


def log_best_model(handle: Any, checkpoint: Path, config_yaml: Path, best_epoch: int) -> str:
    """Log ``checkpoint`` (the run's best, epoch ``best_epoch``) as the run's MLflow model; returns its model id.

    The steps of ``mlflow.pyfunc.log_model``, spelled out with an explicit client: that function logs through the
    process-wide tracking URI and active run, which the driver does not set (it may talk to several stores)."""
    from mlflow.entities import LoggedModelOutput, LoggedModelStatus
    from mlflow.models import Model

    from rgnet.train.checkpoint import CHECKPOINT_FILE

    client = handle.client()
    found = find_logged_model(client, handle.experiment_id, handle.run_id, best_epoch)
    if found is not None:
        return str(found.model_id)
    logged = client.create_logged_model(
        handle.experiment_id,
        name=MODEL_NAME,
        source_run_id=handle.run_id,
        tags={BEST_EPOCH_TAG: str(best_epoch)},
        model_type="rgnet",
    )
    try:
        with tempfile.TemporaryDirectory() as tmp:
            files = Path(tmp) / "files"  # the artifacts keep these names inside the model
            files.mkdir()
            shutil.copyfile(checkpoint, files / CHECKPOINT_FILE)
            shutil.copyfile(config_yaml, files / "config.yaml")
            local = os.path.join(tmp, MODEL_NAME)
            meta = Model(
                artifact_path=logged.artifact_location,
                model_uuid=logged.model_id,
                run_id=handle.run_id,
                model_id=logged.model_id,
            )
            with _quiet_save():
                mlflow.pyfunc.save_model(
                    local,
                    python_model=str(ENTRY_FILE),
                    artifacts={
                        CHECKPOINT_ARTIFACT: str(files / CHECKPOINT_FILE),
                        CONFIG_ARTIFACT: str(files / "config.yaml"),
                    },
                    mlflow_model=meta,
                    pip_requirements=pip_requirements(),
                    metadata={"best_epoch": best_epoch, "input_fields": list(INPUT_FIELDS)},
                )
            client.log_model_artifacts(logged.model_id, local)
        client.log_outputs(handle.run_id, [LoggedModelOutput(logged.model_id, step=best_epoch)])
    except BaseException:
        client.finalize_logged_model(logged.model_id, LoggedModelStatus.FAILED)
        raise
    client.finalize_logged_model(logged.model_id, LoggedModelStatus.READY)
    return str(logged.model_id)


# ---------------------------------------------------------------------------------------------------------------
# Loading the checkpoint behind a model URI (rgnet evaluate / rgnet predict --model-uri)
# ---------------------------------------------------------------------------------------------------------------
def checkpoint_in(local: Path) -> Path:
    """The checkpoint inside a downloaded model folder: this module's layout (an MLmodel whose pyfunc artifacts hold
    it), or the plain folder of runs logged before it (``checkpoint.pt`` at the top)."""
    from mlflow.models import Model

    from rgnet.train.checkpoint import CHECKPOINT_FILE

    if local.is_file():
        return local
    if (local / "MLmodel").is_file():
        flavor = Model.load(str(local)).flavors.get("python_function", {})
        artifact = flavor.get("artifacts", {}).get(CHECKPOINT_ARTIFACT, {})
        if "path" in artifact:
            return local / artifact["path"]
    return local / CHECKPOINT_FILE


def model_location(uri: str, store: str) -> str:
    """The storage location of the model at a ``runs:/`` or ``models:/`` URI, looked up in ``store``.

    MLflow's own resolution of these URIs (``ModelsArtifactRepository``, and ``RunsArtifactRepository`` for a
    logged model) reads the process-wide tracking and registry URIs, not the store asked for; an explicit client
    resolves them here.  ``runs:/<run>/<name>`` is the run's newest logged model of that name, else (runs logged
    before there were logged models) the run's artifact folder of that name."""
    from mlflow import MlflowClient
    from mlflow.store.artifact.models_artifact_repo import ModelsArtifactRepository
    from mlflow.store.artifact.runs_artifact_repo import RunsArtifactRepository
    from mlflow.store.artifact.utils.models import get_model_name_and_version

    client = MlflowClient(tracking_uri=store, registry_uri=store)
    if ModelsArtifactRepository.is_models_uri(uri):
        model_uri, sub = ModelsArtifactRepository.split_models_uri(uri)
        ids = get_model_name_and_version(client, model_uri)
        if len(ids) == 1:  # models:/<model id>
            location = client.get_logged_model(ids[0]).artifact_location
        else:
            location = client.get_model_version_download_uri(*ids)
        return location.rstrip("/") + (f"/{sub}" if sub else "")
    if RunsArtifactRepository.is_runs_uri(uri):
        run_id, path = RunsArtifactRepository.parse_runs_uri(uri)
        run = client.get_run(run_id)
        name, _, sub = (path or "").partition("/")
        page_token = None
        while name:
            page = client.search_logged_models(
                [run.info.experiment_id], filter_string=f"name = '{name}'", page_token=page_token
            )
            found = [m for m in page if m.source_run_id == run_id]  # newest first (the store's default order)
            if found:
                return found[0].artifact_location.rstrip("/") + (f"/{sub}" if sub else "")
            if not page.token:
                break
            page_token = page.token
        return run.info.artifact_uri.rstrip("/") + (f"/{path}" if path else "")
    return uri


def load_payload(uri: str, store: str) -> dict[str, Any]:
    """Download the model at ``uri`` (runs:/, models:/ or a local path) from ``store`` and load its checkpoint."""
    import mlflow.artifacts

    from rgnet.train.checkpoint import load_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        try:
            location = model_location(uri, store)
            local = mlflow.artifacts.download_artifacts(artifact_uri=location, tracking_uri=store, dst_path=tmp)
        except Exception as e:
            raise FileNotFoundError(f"cannot download {uri} from the MLflow store {store}: {e}") from e
        path = checkpoint_in(Path(local))
        if not path.is_file():
            raise FileNotFoundError(f"{uri} in the MLflow store {store} holds no rgnet checkpoint (looked for {path})")
        return load_checkpoint(path)

"""The code MLflow runs to build the logged RGNet model (MLflow's "models from code": this file is copied into the
model and executed on load; nothing is pickled).  See :mod:`pipelines.mlflow_model`."""

import mlflow.models

from pipelines.mlflow_model import RGNetPyfunc

mlflow.models.set_model(RGNetPyfunc())

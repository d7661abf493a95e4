"""The registered model's MLflow pyfunc, logged as "models from code"
(https://mlflow.org/docs/latest/ml/model/models-from-code/): MLflow keeps a copy of this file with
every registered version and runs it to load the model, so nothing is pickled by reference to a
module path that could move. It needs the flywheel package (model.*) where it loads.

`predict` returns P(positive class) per row; the label mapping is in the model's metadata.
"""
import mlflow
from mlflow.models import set_model


class FlywheelPyfunc(mlflow.pyfunc.PythonModel):
    """A Flywheel model directory (artifact `model_dir`) behind MLflow's pyfunc interface."""

    def load_context(self, context):
        from model.loader import load_model

        self.model = load_model(context.artifacts["model_dir"])

    def predict(self, context, model_input, params=None):
        import numpy as np

        return np.asarray(self.model.predict_proba(model_input), dtype=np.float64)


set_model(FlywheelPyfunc())

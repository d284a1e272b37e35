"""What MLflow runs to build a logged prompt model when it loads one ("models from code": nothing unpickled)."""

import mlflow

from ptune_search.prompts.mlflow_model import PromptClassifierModel

mlflow.models.set_model(PromptClassifierModel())

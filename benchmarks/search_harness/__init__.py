"""What a search benchmark or test drives: a search driver run as a user would, an MLflow server it can kill.

Tests import these too (``tests.search.search_process``, ``tests.reliability.mlflow_server``).
"""

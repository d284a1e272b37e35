"""Ray-distributed hyperparameter search for prompt tuning of LLMs whose blocks are served by a swarm."""

from ptune_search.models.ptune import PTuneConfig, PTuneMixin

__all__ = ["PTuneConfig", "PTuneMixin"]

"""Ray-distributed hyperparameter search for prompt tuning of LLMs whose blocks are served by a swarm."""

from ptune_search.ptune import PTuneConfig, PTuneMixin

__all__ = ["PTuneConfig", "PTuneMixin"]

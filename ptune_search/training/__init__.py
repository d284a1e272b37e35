"""Prompt tuning in one process: the steps and evaluation every trial runs, and the demo built on them."""

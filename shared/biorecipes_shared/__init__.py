"""Distributed setup, checkpointing and logging shared by every biorecipes recipe."""

__version__ = "0.1.0"

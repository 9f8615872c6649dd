"""CLI commands of this area (filled in by its owner)."""

from __future__ import annotations

import typer


def register(app: typer.Typer, train_app: typer.Typer, evaluate_app: typer.Typer) -> None:
    """Add this area's commands to the top-level app and the train/evaluate groups."""

"""The ``ichnode`` admin CLI (Typer + Rich). One module per area registers its commands."""

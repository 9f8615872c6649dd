"""What every CLI module shares: loading settings, printing tables or JSON, clean errors."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, NoReturn

import typer
from rich.console import Console
from rich.table import Table

from node.config import ConfigError, Settings, load_settings

console = Console()
err_console = Console(stderr=True)


@dataclass
class CliState:
    config_path: Path | None = None
    _settings: Settings | None = None

    def settings(self) -> Settings:
        if self._settings is None:
            try:
                self._settings = load_settings(self.config_path)
            except ConfigError as exc:
                fail(str(exc))
        return self._settings


STATE = CliState()


def fail(message: str, code: int = 1) -> NoReturn:
    """One clear line on stderr and a non-zero exit, never a traceback."""
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str, ensure_ascii=False) + "\n")


def print_rows(rows: list[dict[str, Any]], columns: Iterable[str], *, title: str | None = None,
               as_json: bool = False) -> None:
    """A listing as a Rich table, or as a JSON array with ``--json``."""
    columns = list(columns)
    if as_json:
        print_json([{c: r.get(c) for c in columns} for r in rows])
        return
    table = Table(title=title, show_lines=False)
    for c in columns:
        table.add_column(c)
    for r in rows:
        table.add_row(*("" if r.get(c) is None else str(r.get(c)) for c in columns))
    console.print(table)


JSON_OPTION = typer.Option(False, "--json", help="Print JSON instead of a table")

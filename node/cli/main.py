"""Entry point of the ``ichnode`` command: global options and the command groups."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import typer

from node.cli import common
from node.cli.common import STATE, console, fail, print_json
from node.config import masked_dump

app = typer.Typer(
    name="ichnode",
    help="PACS-integrated DICOM node for emergency head CT (ICH triage, segmentation, SEG/SR).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
config_app = typer.Typer(help="Check and show the configuration.", no_args_is_help=True)
train_app = typer.Typer(help="Train models on phantoms or your own data.", no_args_is_help=True)
evaluate_app = typer.Typer(help="Evaluate models on held-out data.", no_args_is_help=True)
app.add_typer(config_app, name="config")
app.add_typer(train_app, name="train")
app.add_typer(evaluate_app, name="evaluate")


@app.callback()
def main(
    config: Optional[Path] = typer.Option(
        None, "--config", "-c", envvar="ICHNODE_CONFIG", help="Config file (TOML or YAML)"
    ),
) -> None:
    STATE.config_path = config
    STATE._settings = None


@config_app.command("check")
def config_check(as_json: bool = common.JSON_OPTION) -> None:
    """Validate the config file and print the effective configuration (secrets masked)."""
    settings = STATE.settings()
    data = masked_dump(settings)
    unknown = [n for n in settings.routing.results_to if n not in settings.destinations]
    if unknown:
        fail(f"routing.results_to names unknown destination(s): {', '.join(unknown)}")
    from node.routing import RulesError, rules_for  # results area: rules checked with the config

    try:
        rules_for(settings)
    except RulesError as exc:
        fail(str(exc))
    if as_json:
        print_json(data)
        return
    import yaml

    console.print(yaml.safe_dump(data, sort_keys=False), highlight=False, end="")
    console.print("[green]configuration OK[/]")


@config_app.command("reference")
def config_reference() -> None:
    """Print the configuration reference (Markdown) from the settings' own descriptions."""
    from node.config import reference_markdown

    print(reference_markdown())


@app.command()
def demo(
    out: Path = typer.Option(Path("demo-out"), help="Work folder (replaced on each run)"),
    thickness: float = typer.Option(5.0, help="Slice thickness of the phantom studies (mm)"),
    timeout: float = typer.Option(900.0, help="Seconds to wait for all results"),
) -> None:
    """Run the whole pipeline on phantoms: node, worker and a local PACS on this machine."""
    from node.demo import run_demo

    try:
        code = run_demo(out, thickness_mm=thickness, timeout_s=timeout)
    except (RuntimeError, OSError) as exc:
        fail(f"demo failed: {exc}")
    raise typer.Exit(code)


def _register_all() -> None:
    # Each area owns one module; registering here keeps ``main`` free of their imports' cost
    # until a command runs (heavy imports such as torch happen inside the commands).
    from node.cli import (ai_cmds, deid_cmds, ner_cmds, node_cmds, phantom_cmds, queue_cmds,
                          results_cmds)

    for module in (node_cmds, queue_cmds, phantom_cmds, deid_cmds, ai_cmds, ner_cmds,
                   results_cmds):
        module.register(app, train_app, evaluate_app)


_register_all()


if __name__ == "__main__":  # pragma: no cover
    logging.basicConfig()
    app()

"""``faultfleet``: the service's commands (migrate, serve, worker, keys, run, demo) and the client
commands that talk to a running API (chips, plan, jobs, models).

Client commands take the server from ``--url`` / ``FAULTFLEET_URL`` and the key from
``--api-key`` / ``FAULTFLEET_API_KEY``. A failure is one line on stderr and a non-zero exit.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import click
import typer

from app.cli import chips, fleet, server
from app.cli.api import CliError

app = typer.Typer(
    name="faultfleet",
    help="Fleet fault-aware retraining for faulty systolic-array accelerator chips.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.registered_commands += server.app.registered_commands
app.add_typer(server.keys_app, name="keys")
app.add_typer(chips.app, name="chips")
app.add_typer(fleet.plan_app, name="plan")
app.add_typer(fleet.jobs_app, name="jobs")
app.add_typer(fleet.models_app, name="models")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (usage errors 2, failures 1, Ctrl-C 130)."""
    command = typer.main.get_command(app)
    try:
        # without standalone mode click returns an Exit's code instead of calling sys.exit
        rv = command.main(args=list(argv) if argv is not None else None, prog_name="faultfleet", standalone_mode=False)
    except CliError as exc:
        print(f"faultfleet: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except click.exceptions.Exit as exc:
        return int(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        return int(exc.exit_code)
    except (click.exceptions.Abort, KeyboardInterrupt):
        print("faultfleet: interrupted", file=sys.stderr)
        return 130
    return rv if isinstance(rv, int) else 0

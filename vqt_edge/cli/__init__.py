"""`vqt-edge`: the command line, one module per command group.

export.py (workstation: checkpoint -> bundle), device.py (train, eval, predict), budget.py (plan,
sweep), tune.py, fleet.py, package.py, info.py, web.py
(the browser page, `import-adapter`). Every command is a thin layer of option parsing over the Python API
(vqt_edge/api.py) or the fleet apps; process-wide settings (logging here, torch blocked and lean
malloc in options.device_command, signal handling through the API's `process_wide`) happen only in
this package. Bad input exits with code 2 and a one-line message (no traceback).
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

import click

from vqt_edge.errors import UserError


class _Group(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except UserError as e:
            click.echo(f"error: {e}", err=True)
            ctx.exit(2)
        except OSError as e:
            from vqt_edge.fileio import DISK_FULL

            if e.errno not in DISK_FULL:
                raise
            click.echo(
                f"error: disk full while writing {e.filename or 'a file'} ({os.strerror(e.errno)}); "
                "the last checkpoint is intact: free space and continue with --resume",
                err=True,
            )
            ctx.exit(2)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="vqt-edge")
def cli() -> None:
    """Visual Query Tuning for pre-trained ViTs, trained on the device.

    \b
    Workstation:  vqt-edge export --model vit_b16 --weights CKPT --num-classes 10 --out BUNDLE
    Device:       vqt-edge train --bundle BUNDLE --data DIR --run RUN
                  vqt-edge eval --run RUN --data TEST_DIR
                  vqt-edge predict --run RUN IMAGE_OR_FOLDER...
    """
    logging.basicConfig(format="warning: %(message)s", level=logging.WARNING, stream=sys.stderr)


def _register_commands() -> None:
    from vqt_edge.cli.budget import plan, sweep
    from vqt_edge.cli.device import eval_cmd, predict, train
    from vqt_edge.cli.export import export
    from vqt_edge.cli.fleet import fleet
    from vqt_edge.cli.info import info
    from vqt_edge.cli.package import package_cmd
    from vqt_edge.cli.tune import tune
    from vqt_edge.cli.web import import_adapter, web

    for command in (export, train, eval_cmd, predict, plan, sweep, tune, fleet, package_cmd, info, web, import_adapter):
        cli.add_command(command)


_register_commands()


def main() -> None:
    cli(prog_name="vqt-edge")

"""The `clockdistill` command: a table of subcommands (clockdistill/commands.py for the core's,
sweeps/commands.py for the sweeps'; this is the one core file that imports sweeps). Every
subcommand has --help; bad input exits 2 with one line."""

from __future__ import annotations

import argparse
import logging
import sys

from clockdistill import commands
from clockdistill.errors import TrainingDiverged, UserError
from sweeps import commands as sweep_commands

GROUPS = {"data": ("make, convert and index data sets", "Make, convert and index COCO-format data sets.")}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="clockdistill",
        description="Train, evaluate and distil DETR detectors (CLoCKDistill) and sweep their distillation "
        "settings with Ray Tune. Start with `clockdistill demo`.",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    parsers: dict[str, argparse.ArgumentParser] = {}
    actions: dict[str, argparse._SubParsersAction] = {}
    for command in (*commands.COMMANDS, *sweep_commands.COMMANDS):
        head, _, action = command.name.partition(" ")
        where = sub
        if action:  # "data synth": an action of the group "data" (a command itself when it runs alone, as demo)
            if head not in actions:
                if head not in parsers:
                    help_text, description = GROUPS[head]
                    parsers[head] = sub.add_parser(head, help=help_text, description=description)
                runs_alone = parsers[head].get_default("run") is not None
                actions[head] = parsers[head].add_subparsers(dest="action", required=not runs_alone, metavar="ACTION")
            where = actions[head]
        parser = where.add_parser(
            action or head, help=command.help, description=command.description or command.help, epilog=command.epilog
        )
        command.arguments(parser)
        parser.set_defaults(run=command.run)
        parsers[command.name] = parser
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        return args.run(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except TrainingDiverged as exc:
        print(f"error: training diverged: {exc}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # MLflow's 401 / 403: one line naming the account (sweeps/tracking/accounts.py)
        from sweeps.tracking.accounts import refusal

        message = refusal(exc)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""The `tokencredit` command: `tokencredit <command> [--config run.yaml] key=value ...`.

Which commands exist, their config classes, run functions and flags: :data:`tokencredit.commands.COMMANDS`.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import json
import logging
import os
import sys

from tokencredit import __version__
from tokencredit.commands import COMMANDS, Command
from tokencredit.config import ConfigError, import_object, load_config
from tokencredit.judges.backends import JudgeError
from tokencredit.record_files import RecordError
from tokencredit.runs import CheckpointError

log = logging.getLogger("tokencredit")


class _HelpWithFields(argparse.Action):
    """-h/--help that appends every field of the command's config class (type, default, description)."""

    def __init__(self, option_strings: list[str], dest: str, command: str = "", **kwargs: object) -> None:
        """Remember which command's config class to describe."""
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS,
                         help="show this help, with every setting, and exit")
        self.command = command

    def __call__(self, parser: argparse.ArgumentParser, namespace: object, values: object,
                 option_string: str | None = None) -> None:
        """Print the usage, the options and the settings, then exit."""
        from tokencredit.config import format_fields

        cls = import_object(COMMANDS[self.command].config, "config")
        sys.stdout.write(parser.format_help() + "\n" + format_fields(cls) + "\n")
        parser.exit()


def _add_command(sub: argparse._SubParsersAction, name: str, cmd: Command) -> None:
    """A subcommand from its table entry: flags, --config FILE.yaml where it takes one, key=value overrides."""
    config_name = cmd.config.rpartition(":")[2]
    parser = sub.add_parser(name, help=cmd.help, description=f"{cmd.description} ({config_name})", add_help=False)
    parser.add_argument("-h", "--help", action=_HelpWithFields, command=name)
    for flag in cmd.flags:
        if flag.switch:
            parser.add_argument(flag.name, action="store_true", help=flag.help)
        elif flag.name.startswith("-"):
            parser.add_argument(flag.name, type=flag.type, choices=flag.choices, help=flag.help)
        else:
            parser.add_argument(flag.name, type=flag.type, choices=flag.choices, help=flag.help)
    if cmd.config_file:
        parser.add_argument("--config", help=f"YAML file with {config_name} fields")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help=f"{config_name} settings that win over the file, e.g. {cmd.example}")


def build_parser() -> argparse.ArgumentParser:
    """Argument parser of the `tokencredit` command, one subcommand per entry of COMMANDS."""
    parser = argparse.ArgumentParser(prog="tokencredit", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="version", version=f"tokencredit {__version__}")
    parser.add_argument("--allow-download", action="store_true",
                        help="let a hub id that is not in the local cache download (same as "
                             "TOKENCREDIT_ALLOW_DOWNLOAD=1); off by default, so runs stay offline")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, cmd in COMMANDS.items():
        _add_command(sub, name, cmd)
    return parser


def command_config(name: str, args: argparse.Namespace) -> object:
    """The config of `tokencredit <name>`: embedded defaults, then the file, then key=value, then the flags (a
    flag wins); with fast=true the command's fast sizes become the base that the file and overrides still change."""
    cmd = COMMANDS[name]
    cls = import_object(cmd.config, "config")
    overrides, exact = list(getattr(args, "overrides", [])), {}
    for flag in cmd.flags:
        value = getattr(args, flag.dest, None)
        if flag.to_run or value is None or value is False:
            continue
        if flag.exact:
            exact[flag.key] = value
        else:
            overrides.append(f"{flag.key}=true" if flag.switch else f"{flag.key}={value}")
    path = getattr(args, "config", None)
    base = import_object(cmd.defaults, "defaults") if cmd.defaults else None
    cfg = load_config(cls, path, overrides, base=base)
    if cmd.fast_defaults and getattr(cfg, "fast", False):
        cfg = load_config(cls, path, overrides, base=import_object(cmd.fast_defaults, "defaults"))
    return dataclasses.replace(cfg, **exact) if exact else cfg


def demo_config(args: argparse.Namespace) -> object:
    """DemoConfig from the file, the flags and key=value overrides (flags win); --fast brings its small sizes."""
    return command_config("demo", args)


def _check_multi_process(args: argparse.Namespace) -> None:
    """Under `accelerate launch`, refuse the commands that run in one process (they would write N times)."""
    from tokencredit.distributed import launched_world_size

    action = getattr(args, "action", "") if args.command == "reward" else ""
    if launched_world_size() > 1 and action not in COMMANDS[args.command].distributed:
        allowed = [f"{n} {a}".strip() for n, c in COMMANDS.items() for a in c.distributed]
        command = f"{args.command} {action}".strip()
        raise ConfigError(f"`tokencredit {command}` runs in one process; under accelerate launch only "
                          f"{', '.join(allowed[:-1])} and {allowed[-1]} spread over processes (see "
                          "docs/distributed.md)")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `tokencredit` command."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        # argparse fills serve's key=value positionals before it meets the flags after MODEL; collect the rest.
        if getattr(args, "command", None) == "serve" and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides = [*args.overrides, *extra]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    from tokencredit.distributed import is_main_process

    # Under `accelerate launch` every rank runs this; only rank 0 reports progress (the others warn only).
    logging.basicConfig(level=logging.INFO if is_main_process() else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    # rouge-score logs through absl at INFO on every scorer it builds ("Using default tokenizer.").
    logging.getLogger("absl").setLevel(logging.WARNING)
    if getattr(args, "allow_download", False):
        from tokencredit.models import ALLOW_DOWNLOAD_ENV

        os.environ[ALLOW_DOWNLOAD_ENV] = "1"
    try:
        _check_multi_process(args)
        cmd = COMMANDS[args.command]
        cfg = command_config(args.command, args)
        extras = {flag.key: getattr(args, flag.dest) for flag in cmd.flags if flag.to_run}
        result = import_object(cmd.run, "run")(cfg, **extras)
        if cmd.report is not None:
            print(json.dumps(cmd.report(result), indent=1))
    except (ConfigError, RecordError, FileNotFoundError, ValueError, JudgeError, CheckpointError) as exc:
        print(f"tokencredit: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except OSError as exc:
        # The machine, not the program: a full disk, a read-only or vanished folder, no permission.
        print(f"tokencredit: error: {_os_error_message(exc)}", file=sys.stderr)
        return 2
    return 0


def _one_line(exc: BaseException) -> str:
    """An error message on one line: some libraries' messages span several, and scripts read one line per error."""
    return " ".join(str(exc).split()) or type(exc).__name__


_OS_ERROR_HINTS = {
    errno.ENOSPC: "the disk is full: free space or choose another output folder; a run resumes from its last "
                  "checkpoint with resume=true",
    errno.EDQUOT: "the disk quota is used up: free space or choose another output folder; a run resumes from its "
                  "last checkpoint with resume=true",
    errno.EROFS: "the file system is read-only: choose another output folder",
    errno.EACCES: "no permission: choose a folder you can write, or fix its permissions",
    errno.EPERM: "not permitted: choose a folder you can write, or fix its permissions",
}


def _os_error_message(exc: OSError) -> str:
    """What failed, on which file, and what to do about it."""
    where = f" ({exc.filename})" if exc.filename else ""
    reason = exc.strerror or _one_line(exc)
    hint = _OS_ERROR_HINTS.get(exc.errno)
    return f"{reason}{where}" + (f": {hint}" if hint else "")


if __name__ == "__main__":
    sys.exit(main())

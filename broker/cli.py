"""Command line: ``run`` (default), ``demo``, ``check``, ``env``. No business logic here."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

from broker import __version__, daemon, envbundle, logs, settings
from broker.errors import ConfigError, ReloadError

COMMANDS = ("run", "demo", "check", "env", "webhook", "lambda-extension")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line, exit 2, like every other configuration error.
        self.exit(2, f"wif-broker: error: {message}\n")


def _add_settings(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE", help="TOML settings file")
    for spec in settings.SPECS:
        kwargs: dict[str, object] = {"help": spec.help, "dest": spec.name.replace("-", "_")}
        if spec.kind == "list":
            kwargs["action"] = "append"
        parser.add_argument(f"--{spec.name}", **kwargs)  # type: ignore[arg-type]


def build_parser(*, webhook: bool = False) -> argparse.ArgumentParser:
    """The parser; ``webhook`` adds the webhook's flags (imported only then, so the
    sidecar's start-up never loads broker.webhook)."""
    parser = _Parser(
        prog="wif-broker", description="GCE metadata server backed by Workload Identity Federation"
    )
    parser.add_argument("--version", action="version", version=f"wif-broker {__version__}")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)
    for name, text in (
        ("run", "run the daemon (default)"),
        ("demo", "run the daemon against built-in fake upstreams, offline"),
        ("check", "run the token chain once, step by step, and explain failures"),
        ("env", "print the environment app containers need"),
        ("lambda-extension", "run as an AWS Lambda external extension (SPEC §10)"),
    ):
        command = sub.add_parser(name, help=text)
        _add_settings(command)
        if name == "env":
            command.add_argument("--format", choices=envbundle.FORMATS, default="sh")
    command = sub.add_parser("webhook", help="serve the Kubernetes mutating admission webhook (SPEC §9)")
    if webhook:
        _add_webhook_settings(command)
    return parser


def _add_webhook_settings(parser: argparse.ArgumentParser) -> None:
    # The webhook's flags are a table of their own; the Kubernetes client is imported
    # later still, only when the sub-command runs.
    from broker.webhook.settings import add_flags

    add_flags(parser)


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    if not args_list or args_list[0] not in (*COMMANDS, "-h", "--help", "--version"):
        args_list.insert(0, "run")
    args = build_parser(webhook=args_list[0] == "webhook").parse_args(args_list)
    flags = vars(args)
    try:
        if args.command == "demo":
            from broker.demo import run_demo

            level, fmt = flags.get("log_level") or "info", flags.get("log_format") or "text"
            third_party = flags.get("log_level_third_party") or "info"
            # Logging starts before settings are built: a bad level must exit 2, not raise.
            settings.check_logging(level, fmt)
            if third_party not in ("debug", "info", "warning", "error"):
                problem = f"{third_party!r} is not debug, info, warning or error"
                raise ConfigError("log-level-third-party", problem)
            logs.setup_logging(level, fmt, third_party)
            return asyncio.run(run_demo(flags))
        if args.command == "webhook":
            return _webhook(flags)
        if args.command == "lambda-extension":
            # Lazy: nothing else needs the Extensions API client. Settings are built
            # inside, after registering, so a bad one is reported through init/error.
            from broker.lambda_ext import extension_name, run_extension

            return asyncio.run(run_extension(flags, os.environ, name=extension_name(sys.argv[0])))
        if args.command == "env":
            # Only the listen address matters here; no credentials needed.
            listen = settings.collect(flags, os.environ)["listen"][0]
            sys.stdout.write(envbundle.render(settings.parse_address("listen", listen), args.format))
            return 0
        resolved = settings.build(flags)
        logs.setup_logging(resolved.log_level, resolved.log_format, resolved.log_level_third_party)
        if args.command == "check":
            from broker.check import run_check

            return asyncio.run(run_check(resolved))
        asyncio.run(daemon.serve(resolved, reload=_reloader(flags)))
        return 0
    except ConfigError as exc:
        print(f"wif-broker: configuration error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0


def _webhook(flags: dict[str, object]) -> int:
    from broker.webhook import settings as webhook_settings

    resolved = webhook_settings.build(flags, os.environ)
    logs.setup_logging(resolved.log_level, resolved.log_format)
    # The client library's debug lines carry kubeconfig details and API bodies; they stay
    # out of the log even at debug (SPEC §8: third-party loggers at INFO).
    logging.getLogger("kubernetes_asyncio").setLevel(max(logging.INFO, logging.getLogger().level))
    from broker.webhook.server import serve  # imports kubernetes_asyncio: webhook mode only

    asyncio.run(serve(resolved, os.environ))
    return 0


def _reloader(flags: dict[str, object]) -> Callable[[], settings.Settings]:
    """What SIGHUP runs: the same flags and environment, the files read again."""

    def reload() -> settings.Settings:
        try:
            fresh = settings.build(flags)
        except ConfigError as exc:
            raise ReloadError(_file_of(exc, flags), str(exc)) from None
        logs.setup_logging(fresh.log_level, fresh.log_format, fresh.log_level_third_party)
        return fresh

    return reload


def _file_of(exc: ConfigError, flags: dict[str, object]) -> str:
    """The file a reload error comes from: the TOML for a setting, else the credential file."""
    config = flags.get("config") or os.environ.get(settings.ENV_PREFIX + "CONFIG")
    if config and (exc.name == "config" or (exc.name in settings.NAMES and exc.name != "credentials")):
        return str(config)
    credentials = (
        flags.get("credentials")
        or os.environ.get(settings.ENV_PREFIX + "CREDENTIALS")
        or os.environ.get("GOOGLE_APPLICATION_CREDENTIALS")
    )
    return str(credentials or config or "credentials")

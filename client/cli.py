"""The `robustness` command line.

    robustness submit MODEL.onnx DATA.npz --spec SPEC.yaml --server URL [--wait] [--junit X] [--json Y]
    robustness evaluate MODEL.onnx DATA.npz --spec SPEC.yaml [--out result.json]
    robustness inspect MODEL.onnx [--check] [--json]
    robustness gradient-model MODEL.onnx --out GRAD.onnx [--loss auto] [--device cpu]
    robustness serve [--host H] [--port P] [--data-dir DIR] [--workers N]
    robustness api | worker | migrate | keys create --tenant NAME

`submit` is the client's, and needs only the base install (pip install .). The others run the
engine or the service on this machine and need the server install (pip install '.[server]');
they live in service/commands.py and are listed here only when it is installed.

Exit codes: 0 success, 1 a gate failed (evaluate, submit), 2 bad input (the message says what is
wrong and how to fix it), 3 no gate failed but one is inconclusive: its attack showed signs of
gradient masking (evaluate, submit); submit exits 130 on Ctrl-C (SIGINT) and 143 on SIGTERM.
"""

from __future__ import annotations

import argparse
import sys

from client.submit_cli import add_submit_parser

# the server install's commands, named for a client-only install that lacks them
SERVER_COMMANDS = ("evaluate", "inspect", "gradient-model", "serve", "api", "worker", "migrate", "keys")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="robustness", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    add_submit_parser(commands)
    try:
        from service.commands import add_server_commands
    except ImportError as missing:  # a client-only install
        for name in SERVER_COMMANDS:
            stub = commands.add_parser(name, help="(needs the server install: pip install '.[server]')",
                                       add_help=False)
            stub.add_argument("rest", nargs=argparse.REMAINDER)
            stub.set_defaults(run=_needs_server(name, missing))
    else:
        add_server_commands(commands)
    return parser


def _needs_server(name: str, missing: ImportError):
    def run(args) -> int:
        print(f"robustness: error: `robustness {name}` runs the engine or the service on this machine, "
              f"which this install lacks ({missing}); install it with pip install '.[server]'",
              file=sys.stderr)
        return 2

    return run


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except Exception as exc:  # noqa: BLE001 - only the user's errors end here; the rest re-raise
        code = getattr(exc, "exit_code", None)  # client.errors.CommandError, workers.errors.UserError
        if code is None and isinstance(exc, OSError):
            code = 2  # a file that cannot be read or written
        if code is None:
            raise
        print(f"robustness: error: {exc}", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())

"""Entry point of the `calofm` command.

Each *_commands module exposes `register(subparsers)`; heavy imports (torch) happen inside the
command functions so that `calofm simulate` starts fast. A CalofmError becomes one line on stderr
and exit code 2, never a traceback.
"""

from __future__ import annotations

import importlib
import os
import signal
import sys
import threading

from calofm import __version__
from calofm.cli.args import Parser
from calofm.errors import CalofmError

COMMAND_MODULES = (
    "calofm.cli.demo_commands",  # demo
    "calofm.cli.data_commands",  # materials, geometry, simulate, inspect
    "calofm.cli.model_commands",  # train, generate, info
    "calofm.cli.evaluate_commands",  # evaluate
    "calofm.cli.extension_commands",  # extend material|particle, info
    "calofm.cli.baseline_commands",  # baseline train|generate (diffusion comparison model)
    "calofm.cli.bench_commands",  # bench generate (speed)
    "calofm.cli.export_commands",  # export (ONNX graphs of the decode step)
)


def build_parser() -> Parser:
    parser = Parser(prog="calofm", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"calofm {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def _terminate(signum, frame):
    """SIGTERM in the command's process: unwind like Ctrl-C, so that every writer removes its temporary
    files; a child process (simulation or stream worker) keeps the default action."""
    if os.getpid() != _MAIN_PID:
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    raise KeyboardInterrupt


_MAIN_PID = os.getpid()


def main(argv: list[str] | None = None) -> int:
    global _MAIN_PID
    parser = build_parser()
    args = parser.parse_args(argv)
    _MAIN_PID = os.getpid()
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if in_main_thread else None
    try:
        return int(args.func(args) or 0)
    except CalofmError as exc:
        print(f"calofm {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into `head` and closed early: not an error
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print(f"calofm {args.command}: interrupted; temporary files removed, earlier outputs untouched",
              file=sys.stderr)
        return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())

"""Starts a program's absl app the same way whether it runs as a console script, a root shim or `-m`.

absl takes the usage text of `--help` from the `__main__` module's docstring and lists under `--help` the
flags defined by the module named sys.argv[0]. A program's code lives in maskrcnn_tf/programs/, while
`__main__` is the shim or the console-script wrapper, so `run` hands both over explicitly.
"""
import sys
from typing import Callable, List

from absl import app, flags


def run(app_main: Callable[[List[str]], None], program_module: str) -> None:
    """Runs `app_main(argv)` under absl's app.run with the flags, usage text and exit codes of the program
    defined in module `program_module` (e.g. "maskrcnn_tf.programs.train").

    Exit codes: as absl's, except that --help/--helpshort/--helpfull exit 0 (absl exits 1): asking for
    help is not a failure. Flag errors still print absl's one-line "FATAL Flags parsing error" and exit 1.
    """
    module = sys.modules[program_module]
    sys.modules["__main__"].__doc__ = module.__doc__
    for flag in flags.FLAGS.get_key_flags_for_module(program_module):
        flags.FLAGS.register_key_flag_for_module(sys.argv[0], flag)
    app.run(app_main, flags_parser=_parse_flags_with_usage)


def _parse_flags_with_usage(argv: List[str]) -> List[str]:
    try:
        return app.parse_flags_with_usage(argv)
    except SystemExit as exit_:
        # absl exits from inside flag parsing in two cases: a bad flag (raised while handling the
        # flags.Error) and a help flag (after printing the help, with no error being handled).
        if isinstance(exit_.__context__, flags.Error):
            raise
        raise SystemExit(0) from None

"""Starts a program's absl app the same way whether it runs as a console script, a root shim or `-m`.

absl takes the usage text of `--help` from the `__main__` module's docstring and lists under `--help` the
flags defined by the module named sys.argv[0]. A program's code lives in maskrcnn_tf/programs/, while
`__main__` is the shim or the console-script wrapper, so `run` hands both over explicitly.
"""
import os
import re
import signal
import sys
import tempfile
from typing import Callable, List, NoReturn

from absl import app, flags

# Longer messages (a TensorFlow error can carry a whole graph trace) are cut to this many characters.
MAX_ERROR_CHARS = 600


# SIGINTs received by run()'s handler. A KeyboardInterrupt raised inside a C extension can surface as
# another exception (pycocotools' decode under numpy 2 turned one into a TypeError), so an error after
# Ctrl-C still ends as "interrupted", status 130.
_SIGINTS = []


def _on_sigint(signum, frame):
    _SIGINTS.append(signum)
    raise KeyboardInterrupt


def exit_with_error(error: Exception) -> NoReturn:
    """Prints `error: <the message on one line>` to stderr and exits 1 (tf.errors.OpError: its message
    only, without the op's traceback); after a Ctrl-C, "interrupted" and 130 instead."""
    if _SIGINTS:
        exit_now("interrupted", 130)
    text = " ".join(str(getattr(error, "message", error)).split())
    if len(text) > MAX_ERROR_CHARS:
        text = text[:MAX_ERROR_CHARS] + " ..."
    print(f"error: {text}", file=sys.stderr)
    sys.exit(1)


def exit_now(message: str, status: int) -> NoReturn:
    """Prints `message` to stderr and exits at once, without the interpreter's teardown: after a stopped
    training run or a Ctrl-C, with an input pipeline and a model still alive, that teardown can hang in
    garbage collection (docs/design.md section 16). Output is flushed; files written are on disk."""
    print(message, file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(status)


def run(app_main: Callable[[List[str]], None], program_module: str, configure_allocator: bool = False) -> None:
    """Runs `app_main(argv)` under absl's app.run with the flags, usage text and exit codes of the program
    defined in module `program_module` (e.g. "maskrcnn_tf.programs.train"). configure_allocator: first
    keep freed host memory for reuse (glibc malloc settings, TF's CPU tensor pool), before TensorFlow
    allocates (host_allocator.py).

    Exit codes: as absl's, except that --help/--helpshort/--helpfull exit 0 (absl exits 1): asking for
    help is not a failure. Flag errors still print absl's one-line "FATAL Flags parsing error" and exit 1.
    Ctrl-C prints "interrupted" instead of a traceback and exits 130, as a shell reports SIGINT.
    """
    if configure_allocator:
        from maskrcnn_tf import host_allocator

        host_allocator.configure()
    module = sys.modules[program_module]
    sys.modules["__main__"].__doc__ = module.__doc__
    for flag in flags.FLAGS.get_key_flags_for_module(program_module):
        flags.FLAGS.register_key_flag_for_module(sys.argv[0], flag)
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _on_sigint)
    try:
        app.run(app_main, flags_parser=_parse_flags_with_usage)
    except KeyboardInterrupt:
        exit_now("interrupted", 130)
    except Exception:
        if _SIGINTS:
            exit_now("interrupted", 130)
        raise


# TensorFlow's start-up lines on a host without an NVIDIA driver: written by C++ before absl's logging is
# initialised, so TF_CPP_MIN_LOG_LEVEL does not reach them, and the cuInit one reads like a failure.
STARTUP_NOISE = re.compile(
    r"All log messages before absl::InitializeLog|cudart_stub\.cc|cuda_platform\.cc.*cuInit|cpu_feature_guard\.cc"
    r"|^To enable the following instructions|port\.cc:\d+\] oneDNN custom operations are on|Unable to register "
    r"cu(DNN|FFT|BLAS) factory|computation placer already registered|TF-TRT Warning")
NVIDIA_DRIVER = "/proc/driver/nvidia"


def start_tensorflow_quietly() -> None:
    """Imports TensorFlow and lists its devices (which loads the CUDA stubs) with stderr captured, then
    replays every captured line except STARTUP_NOISE. Only on hosts without an NVIDIA driver, where those
    lines say nothing; with a GPU driver present TensorFlow's own messages stay as they are."""
    if os.path.exists(NVIDIA_DRIVER) or "tensorflow" in sys.modules:
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as captured:
        os.dup2(captured.fileno(), 2)
        try:
            import tensorflow as tf

            tf.config.list_physical_devices()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            lines = captured.read().decode("utf-8", "replace").splitlines()
            kept = [line for line in lines if line.strip() and not STARTUP_NOISE.search(line)]
            if kept:
                print("\n".join(kept), file=sys.stderr, flush=True)


def _parse_flags_with_usage(argv: List[str]) -> List[str]:
    try:
        argv = app.parse_flags_with_usage(argv)
        start_tensorflow_quietly()
        return argv
    except SystemExit as exit_:
        # absl exits from inside flag parsing in two cases: a bad flag (raised while handling the
        # flags.Error) and a help flag (after printing the help, with no error being handled).
        if isinstance(exit_.__context__, flags.Error):
            raise
        raise SystemExit(0) from None

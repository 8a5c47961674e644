"""stop_signals.catch_stop_signals, in a child process that signals itself (no TensorFlow needed)."""
import signal
import subprocess
import sys
import textwrap

import pytest

from tests.conftest import REPO_ROOT

SCRIPT = textwrap.dedent("""
    import os, signal, sys, threading
    from maskrcnn_tf.stop_signals import catch_stop_signals

    before = signal.getsignal(signal.SIGTERM)
    in_thread = []
    thread = threading.Thread(target=lambda: in_thread.append(catch_stop_signals().__enter__().signum))
    thread.start(); thread.join()
    print("thread", in_thread[0], signal.getsignal(signal.SIGTERM) is before, flush=True)

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # as nohup or a background job would
    with catch_stop_signals() as request:
        print("ignored stays", signal.getsignal(signal.SIGINT) is signal.SIG_IGN, flush=True)
        os.kill(os.getpid(), signal.SIGINT)
        print("after SIGINT", request.signum, flush=True)
    print("restored", signal.getsignal(signal.SIGTERM) is before, flush=True)

    signal.signal(signal.SIGINT, signal.default_int_handler)
    with catch_stop_signals() as request:
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C: recorded, no KeyboardInterrupt
        print("after SIGINT", request.name, flush=True)
    print("Ctrl-C handler back", signal.getsignal(signal.SIGINT) is signal.default_int_handler, flush=True)

    with catch_stop_signals() as request:
        os.kill(os.getpid(), signal.SIGTERM)
        print("after SIGTERM", request.name, flush=True)
        os.kill(os.getpid(), signal.SIGTERM)
        print("not reached", flush=True)
""")


def test_first_signal_is_recorded_second_exits_at_once():
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, cwd=REPO_ROOT, timeout=60)
    assert proc.stdout.splitlines() == [
        "thread None True",  # outside the main thread: nothing installed, nothing recorded
        "ignored stays True",
        "after SIGINT None",  # an ignored signal is not caught
        "restored True",
        "after SIGINT SIGINT",
        "Ctrl-C handler back True",
        "after SIGTERM SIGTERM",
    ], proc.stdout + proc.stderr
    assert proc.returncode == 128 + signal.SIGTERM
    assert proc.stderr.splitlines() == [
        "SIGINT: stopping after the current step and saving a checkpoint there (SIGINT again exits now)",
        "SIGTERM: stopping after the current step and saving a checkpoint there (SIGTERM again exits now)",
        "SIGTERM again: exiting now, without a checkpoint of the step in flight",
    ]


def test_an_error_raised_after_ctrl_c_still_ends_as_interrupted(monkeypatch):
    # A KeyboardInterrupt raised inside a C extension can surface as another exception (pycocotools'
    # mask decode turned one into "TypeError: __array__() got an unexpected keyword argument 'copy'").
    from maskrcnn_tf.programs import launch

    exits = []

    def fake_exit_now(message, status):
        exits.append((message, status))
        raise SystemExit(status)

    monkeypatch.setattr(launch, "exit_now", fake_exit_now)
    monkeypatch.setattr(launch, "_SIGINTS", [])
    with pytest.raises(KeyboardInterrupt):
        launch._on_sigint(signal.SIGINT, None)  # the handler run() installs: records, then interrupts
    assert launch._SIGINTS == [signal.SIGINT]
    with pytest.raises(SystemExit):
        launch.exit_with_error(TypeError("__array__() got an unexpected keyword argument 'copy'"))
    assert exits == [("interrupted", 130)]
    monkeypatch.setattr(launch, "_SIGINTS", [])  # without a Ctrl-C an error stays an error
    with pytest.raises(SystemExit) as exit_:
        launch.exit_with_error(ValueError("bad input"))
    assert exit_.value.code == 1 and exits == [("interrupted", 130)]

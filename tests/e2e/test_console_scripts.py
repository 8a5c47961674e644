"""The console scripts setup.py installs (maskrcnn-train, ...) and the root shims (train.py, ...) run the same
programs: same help, same one-line errors, same exit codes; help exits 0.

The console scripts exist once the package is installed (`pip install -e '.[test]'`, as the CI does); the
script tests skip when maskrcnn_tf is not installed as a distribution at all.
"""
import ast
import importlib.metadata
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO_ROOT

# console script -> (root shim that must keep working, a flag only that program defines)
PROGRAMS = {
    "maskrcnn-train": ("train.py", "--train_file_pattern"),
    "maskrcnn-eval": ("eval.py", "--eval_file_pattern"),
    "maskrcnn-export": ("export.py", "--export_dir"),
    "maskrcnn-predict": ("predict.py", "--saved_model"),
    "maskrcnn-import": ("import_weights.py", "--params_override"),
    "maskrcnn-coco-to-tfrecord": ("data_prep/coco_to_tfrecord.py", "--[no]include_masks"),
    "maskrcnn-txt-to-tfrecord": ("data_prep/txt_to_tfrecord.py", "--class_names"),
    "maskrcnn-make-shapes": ("data_prep/make_shapes_dataset.py", "--max_shapes"),
}


def _console_scripts():
    try:
        dist = importlib.metadata.distribution("maskrcnn_tf")
    except importlib.metadata.PackageNotFoundError:  # a source checkout on sys.path; CI installs it
        pytest.skip("maskrcnn_tf is not installed (pip install -e .): no console scripts")
    return {ep.name: ep.value for ep in dist.entry_points if ep.group == "console_scripts"}


def _which(script):
    # The venv's bin directory, even when the venv is not activated (PATH without it).
    path = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])
    found = shutil.which(script, path=path)
    assert found, f"{script} not installed: reinstall with pip install -e ."
    return found


def _run(command):
    return subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)


def _program_lines(stderr):
    """stderr without TensorFlow's and absl's C++ start-up log lines (timestamps differ per run)."""
    return [line for line in stderr.splitlines()
            if line.startswith(("FATAL", "error:", "Pass --help"))]


def test_every_program_is_installed_as_a_console_script():
    scripts = _console_scripts()
    assert set(scripts) == set(PROGRAMS)
    for name, target in scripts.items():
        module, function = target.split(":")
        assert function == "main", target
        assert importlib.util.find_spec(module) is not None, target
        _which(name)


@pytest.mark.parametrize("script", sorted(PROGRAMS))
def test_help_exits_0_and_lists_the_program_flags(script):
    _console_scripts()
    shim, own_flag = PROGRAMS[script]
    run = _run([_which(script), "--help"])
    assert run.returncode == 0, run.stderr[-2000:]
    # absl prints the program's docstring, then the flags of the main module: without the key-flag
    # hand-over in programs/launch.py the list would be empty (the flags live in maskrcnn_tf.programs).
    assert f"python {shim}" in run.stdout
    assert own_flag in run.stdout
    assert "--verbosity" not in run.stdout  # absl's own flags only under --helpfull


def test_helpfull_exits_0_and_lists_all_flags():
    _console_scripts()
    run = _run([_which("maskrcnn-train"), "--helpfull"])
    assert run.returncode == 0, run.stderr[-2000:]
    assert "--train_file_pattern" in run.stdout and "--verbosity" in run.stdout


@pytest.mark.parametrize("args, expected", [
    (["--no_such_flag=1"], ["FATAL Flags parsing error: Unknown command line flag 'no_such_flag'",
                            "Pass --helpshort or --helpfull to see help on flags."]),
    # An empty pattern (an unset shell variable) must neither train the demo nor pass silently.
    (["--train_file_pattern=", "--model_dir=never_created"],
     ["error: --train_file_pattern is empty (the built-in demo runs with no flags at all, or with --demo)"]),
])
def test_errors_are_the_same_one_line_through_script_and_shim(args, expected):
    _console_scripts()
    script = _run([_which("maskrcnn-train"), *args])
    shim = _run([sys.executable, str(REPO_ROOT / "train.py"), *args])
    for run in (script, shim):
        assert run.returncode == 1, run.stderr[-2000:]
        assert _program_lines(run.stderr) == expected, run.stderr[-2000:]
        assert "Traceback" not in run.stderr
    assert not (REPO_ROOT / "never_created").exists()


@pytest.mark.parametrize("script", sorted(PROGRAMS))
def test_root_files_are_shims_without_path_hacks(script):
    # A root file only imports its program's main(): one copy of the code, installed or not.
    shim = PROGRAMS[script][0]
    tree = ast.parse((REPO_ROOT / shim).read_text())
    imports = [node for node in tree.body if isinstance(node, ast.ImportFrom)]
    program = "maskrcnn_tf.programs." + os.path.splitext(os.path.basename(shim))[0]
    assert [(node.module, [alias.name for alias in node.names]) for node in imports] == [(program, ["main"])]
    assert not [node for node in tree.body if isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.Assign))]
    for path in [REPO_ROOT / shim, REPO_ROOT / "maskrcnn_tf" / "programs" / os.path.basename(shim)]:
        assert "sys.path" not in path.read_text(), path


def test_ctrl_c_is_one_line_and_status_130(tmp_path):
    # A long shapes run, interrupted once it writes images: no traceback (launch.run, every program).
    output_dir = tmp_path / "shapes"
    process = subprocess.Popen(
        [sys.executable, str(REPO_ROOT / "data_prep/make_shapes_dataset.py"), f"--output_dir={output_dir}",
         "--num_train=100000", "--num_val=0"], cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # not inherited as ignored
    deadline = time.monotonic() + 120
    while process.poll() is None and time.monotonic() < deadline and not any((output_dir / "train").glob("*")):
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr[-2000:]
    assert stderr.strip().splitlines()[-1] == "interrupted" and "Traceback" not in stderr, stderr[-2000:]

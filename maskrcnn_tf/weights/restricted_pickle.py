"""Unpickling limited to an allow-list of globals: how checkpoints from the internet are read safely.

A pickle can name any importable callable (os.system, builtins.eval, ...) and have it called while it is
loaded. `RestrictedUnpickler` resolves a global only when its "module.name" is a key of the allow-list it
is given, and maps it to the stand-in the reader supplies (a NumPy array builder, never the original
torch function). Any other global raises `RefusedGlobal` before anything is called, so nothing in the
file runs. The checkpoint readers (torch_pickle.py, detectron2_pickle.py) turn it into one-line
ValueErrors naming the file.
"""

import pickle
from typing import Callable, Dict


class RefusedGlobal(pickle.UnpicklingError):
    """The pickle names a global outside the allow-list."""

    def __init__(self, qualified_name: str):
        super().__init__(qualified_name)
        self.qualified_name = qualified_name


def refusal_message(path: str, qualified_name: str) -> str:
    return f"{path}: refused to load: the pickle names global {qualified_name} (not an array builder)"


class RestrictedUnpickler(pickle.Unpickler):
    """pickle.Unpickler whose find_class only returns allow-listed stand-ins.

    allowed: {"module.name": callable or class returned in its place}. persistent_load: optional
    callable(pid) for the pickle's persistent ids (torch's storages); without it they are refused.
    """

    def __init__(self, file, allowed: Dict[str, object], persistent_load: Callable = None, **kwargs):
        super().__init__(file, **kwargs)
        self._allowed = allowed
        self._persistent_load = persistent_load

    def find_class(self, module, name):
        qualified_name = f"{module}.{name}"
        if qualified_name not in self._allowed:
            raise RefusedGlobal(qualified_name)
        return self._allowed[qualified_name]

    def persistent_load(self, pid):
        if self._persistent_load is None:
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
        return self._persistent_load(pid)

"""export_saved_model keeps the log readable: TF's per-signature note listing every captured variable as
an input "with unsupported characters which will be renamed" is dropped, other INFO lines stay."""
import logging

from absl import logging as absl_logging

from maskrcnn_tf import export
from maskrcnn_tf.model import build_model
from tests.e2e.synthetic import tiny_test_config

RENAMED_NOTE = "with unsupported characters which will be renamed"


def test_export_drops_the_renamed_inputs_note(tmp_path, caplog):
    cfg = tiny_test_config()
    model = build_model(cfg)
    previous = absl_logging.get_verbosity()
    absl_logging.set_verbosity(absl_logging.INFO)  # what absl's app.run sets for a program
    try:
        with caplog.at_level(logging.INFO, logger="absl"):
            export.export_saved_model(model, cfg, str(tmp_path / "saved_model"))
    finally:
        absl_logging.set_verbosity(previous)
    messages = [r.getMessage() for r in caplog.records if r.name == "absl"]
    assert messages, "absl INFO records were not captured: the check below would prove nothing"
    assert not [m for m in messages if RENAMED_NOTE in m]
    # The filter is gone afterwards: the note itself is not suppressed process-wide.
    assert export._drop_renamed_inputs_note not in logging.getLogger("absl").filters
    record = logging.LogRecord("absl", logging.INFO, __file__, 0, "Function `f` contains input name(s) 1, 2 "
                               + RENAMED_NOTE + " to unknown, unknown_0 in the SavedModel.", (), None)
    assert not export._drop_renamed_inputs_note(record)

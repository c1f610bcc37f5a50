"""The Qt binding must not corrupt Python's reference counts (it crashed the app once)."""

import sys

from PySide6.QtCore import QObject, Signal


class Emitter(QObject):
    happened = Signal(object)


def test_emitting_signals_keeps_reference_counts(qapp):
    """PySide6 6.12.0 lost a reference to True on every emit(); on Python 3.11 the
    interpreter aborts ("deallocating True") after a long enough streamed story."""
    emitter = Emitter()
    emitter.happened.connect(lambda value: None)
    before = {name: sys.getrefcount(value) for name, value in (("True", True), ("False", False), ("None", None))}
    for _ in range(1000):
        emitter.happened.emit(None)
    after = {name: sys.getrefcount(value) for name, value in (("True", True), ("False", False), ("None", None))}
    assert all(abs(after[k] - before[k]) < 50 for k in before), (before, after)

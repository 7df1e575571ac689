"""The worker's garbage-collector tuning (app.runtime.tune_garbage_collector)."""

from __future__ import annotations

import gc

from app.runtime import GC_THRESHOLDS, tune_garbage_collector


def test_start_up_objects_leave_the_collector_and_passes_are_rarer() -> None:
    thresholds = gc.get_threshold()
    try:
        gc.unfreeze()
        tune_garbage_collector()
        assert gc.get_threshold() == GC_THRESHOLDS
        assert GC_THRESHOLDS[0] >= 10 * thresholds[0]  # far rarer than Python's default 700
        assert gc.get_freeze_count() > 0  # what was alive at start is out of every pass
    finally:
        gc.unfreeze()
        gc.set_threshold(*thresholds)

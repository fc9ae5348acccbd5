"""The lazy migration's fill pace: a small window while the process faults (or has just resumed), the
link's window once it has run QUIET without a fault."""

from __future__ import annotations

from shim.restore.fillpace import FAR_WINDOW, FAULT_RUN, NEAR_WINDOW, QUIET, FillPace
from shim.restore.fillplan import FAULT_RUN as LOCAL_FAULT_RUN


def test_before_the_process_resumes_the_fill_takes_the_link() -> None:
    pace = FillPace()
    assert pace.window(0.0) == FAR_WINDOW and pace.run(0.0) == FAR_WINDOW // 2


def test_resuming_or_faulting_narrows_the_window_until_quiet() -> None:
    pace = FillPace()
    pace.faulted(10.0)
    assert pace.window(10.0) == NEAR_WINDOW and pace.run(10.0) == NEAR_WINDOW // 2
    assert pace.window(10.0 + QUIET / 2) == NEAR_WINDOW
    pace.faulted(10.0 + QUIET / 2)  # a later fault starts the quiet over
    assert pace.window(10.0 + QUIET) == NEAR_WINDOW
    assert pace.window(10.0 + QUIET / 2 + QUIET) == FAR_WINDOW


def test_sizes_keep_a_fault_behind_little() -> None:
    assert FAULT_RUN < LOCAL_FAULT_RUN and FAULT_RUN <= NEAR_WINDOW // 2 < FAR_WINDOW // 2

"""Colours from JupyterLab's theme: every colour the widgets draw with is a ``--jp-…`` CSS variable.

Light, dark and high-contrast themes set these variables, so text, borders and swatches keep their contrast in
each; outside JupyterLab (nbconvert HTML without the lab template, GitHub) each variable's fallback, a light
theme's colour, applies.

In [1]: TEXT
Out[1]: 'var(--jp-content-font-color1, #212121)'
In [2]: status_colour("saved")
Out[2]: 'var(--jp-warn-color0, #a52a2a)'
"""

from __future__ import annotations

TEXT = "var(--jp-content-font-color1, #212121)"
TEXT_SECONDARY = "var(--jp-content-font-color2, #555)"
TEXT_MUTED = "var(--jp-content-font-color3, #777)"
BORDER = "var(--jp-border-color1, #bdbdbd)"
BORDER_LIGHT = "var(--jp-border-color2, #e0e0e0)"
BACKGROUND = "var(--jp-layout-color0, #fff)"
BACKGROUND_RAISED = "var(--jp-layout-color2, #eee)"
ACCENT = "var(--jp-brand-color1, #1976d2)"
SUCCESS = "var(--jp-success-color1, #388e3c)"
ERROR = "var(--jp-error-color1, #d32f2f)"
ERROR_BACKGROUND = "var(--jp-rendermime-error-background, #fdd)"
WARN = "var(--jp-warn-color1, #f57c00)"
SAVED = "var(--jp-warn-color0, #a52a2a)"
PURPLE = "var(--jp-mirror-editor-keyword-color, #800080)"

_STATUS = {
    "pending": TEXT_MUTED, "done": SUCCESS, "freed": TEXT_MUTED, "saved": SAVED, "skipped": TEXT_MUTED,
    "error": ERROR, "not run": TEXT_MUTED, "": TEXT_MUTED,
}
_STATE = {"running": ACCENT, "done": SUCCESS, "failed": ERROR, "interrupted": WARN}


def status_colour(status: str) -> str:
    """The colour of a row's status (``pending``, ``done``, ``saved``, ``error``, ...)."""
    return _STATUS.get(status, TEXT)


def state_colour(state: str) -> str:
    """The colour of a run's state in a header (``running``, ``done``, ``failed``, ...)."""
    return _STATE.get(state, TEXT_SECONDARY)

"""``python -m keyturn.launch``: the ``keyturn`` command, for a venv whose scripts are
not on PATH and for the children the runner starts (the audit ingester).

It must not do anything but hand over to ``keyturn.launch.cli.main``.
"""

from __future__ import annotations

import sys

from keyturn.launch.cli import main

if __name__ == "__main__":
    sys.exit(main())

"""``python -m steerops``: the ``steerops`` command."""
import sys

from .app.cli import main

sys.exit(main())

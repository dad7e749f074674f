"""Moved to `istn.data.brain`; the name stays for ``python -m istn.braindata`` and the data folders citing it."""

import sys

from .data.brain import *  # noqa: F401,F403
from .data.brain import __all__  # noqa: F401
from .data.brain.build import main

if __name__ == "__main__":
    sys.exit(main())

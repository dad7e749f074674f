"""``python -m istn.data.brain OUT [--cache DIR] [--subset a,b] [--spacing MM]``: see `istn.data.brain.build.main`."""

import sys

from .build import main

sys.exit(main())

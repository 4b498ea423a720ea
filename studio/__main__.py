"""``python -m studio``: the ``studio`` command line."""

import sys

from .cli import main

sys.exit(main())

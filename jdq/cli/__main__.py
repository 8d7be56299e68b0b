"""``python -m jdq.cli``: the same as the ``jdq`` console script."""

import sys

from jdq.cli import main

sys.exit(main())

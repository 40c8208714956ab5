"""``python -m pipeline.cli``: the ``optipipe`` command."""

import sys

from pipeline.cli import main

sys.exit(main())

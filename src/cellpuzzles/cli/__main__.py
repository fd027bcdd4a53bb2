"""``python -m cellpuzzles.cli``: the command line."""

import sys

from cellpuzzles.cli.main import main

sys.exit(main())

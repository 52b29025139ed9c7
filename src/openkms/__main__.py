"""`python -m openkms`: the `openkms` command."""

import sys

from .cli.main import main

sys.exit(main())

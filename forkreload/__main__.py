"""`python -m forkreload`: the same as the `forkreload` command."""

import sys

from .cli import main

sys.exit(main())

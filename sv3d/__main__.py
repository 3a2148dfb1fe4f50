"""`python -m sv3d` = the `sv3d` command."""

import sys

from .cli import main

sys.exit(main())

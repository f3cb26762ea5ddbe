"""`python -m proxy` runs the httpsdump command line."""

import sys

from .cli import main

sys.exit(main())

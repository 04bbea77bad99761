"""`python -m ran.cli`: the `ran` command (the form DDP's relaunch and the tests use)."""

import sys

from ran.cli.main import main

sys.exit(main())

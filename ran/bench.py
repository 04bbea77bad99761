"""`python -m ran.bench`: the benchmark's command (its code is `ran.tools.bench`)."""

import os
import sys

from ran.tools.bench import main

if __name__ == "__main__":
    os.environ.setdefault("WANDB_MODE", "disabled")
    main(sys.argv[1:])

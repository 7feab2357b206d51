"""`python -m doco_lib …` is the `doco` command (torchrun and `accelerate launch` start it this way)."""

import sys

from doco_lib.app.cli import main

sys.exit(main())

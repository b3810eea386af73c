"""``python -m alexnet.cli``."""

import sys

from alexnet.cli import main

sys.exit(main())

"""`python -m qrobust` is the `qrobust` command."""

import sys

from qrobust.flows.cli import main

sys.exit(main())

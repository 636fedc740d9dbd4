"""`python -m prequel ...`: the `prequel` command (prequel/cli/commands.py)."""

import sys

from prequel.cli.commands import main

sys.exit(main())

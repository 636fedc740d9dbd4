"""`python train.py --config configs/small.yaml`: the same commands as the installed `prequel` script.

See prequel/cli/commands.py for the commands and `python train.py --help` for every option.
"""

import sys

from prequel.cli.commands import main

if __name__ == "__main__":
    sys.exit(main())

"""``python3 -m trigger``: the same as ``jobctl``."""

import sys

from trigger.jobctl import main

if __name__ == "__main__":
    sys.exit(main())

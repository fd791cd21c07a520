"""``python3 -m trigger``: the same as ``jobctl``."""

import gc

gc.disable()  # while importing: jobctl's run() turns it back on (see its docstring)

from trigger.preconnect import main  # noqa: E402 - after gc.disable(), on purpose

if __name__ == "__main__":
    main()

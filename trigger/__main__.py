"""``python3 -m trigger``: the same as ``jobctl``."""

import gc

gc.disable()  # while importing: run() turns it back on (see its docstring)

from trigger.jobctl import run  # noqa: E402 - after gc.disable(), on purpose

if __name__ == "__main__":
    run()

"""``python3 -m trigger``: the same as ``jobctl``."""

from trigger.jobctl import run

if __name__ == "__main__":
    run()

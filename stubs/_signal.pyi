# The C module that `signal` wraps; typeshed has no stub for it. The runner and jobctl import it instead
# of `signal`, whose import builds three enum classes (~0.4 ms of every connection and every jobctl).
# Only what they use, typed as `signal.pyi` types it, but with the plain int constants `_signal` has.
from collections.abc import Callable
from types import FrameType

_Handler = Callable[[int, FrameType | None], object] | int | None

SIG_IGN: int
SIGHUP: int
SIGINT: int
SIGKILL: int
SIGPIPE: int
SIGTERM: int
SIGXFSZ: int

def signal(signalnum: int, handler: _Handler, /) -> _Handler: ...
def getsignal(signalnum: int, /) -> _Handler: ...
def set_wakeup_fd(fd: int, /, *, warn_on_full_buffer: bool = True) -> int: ...

"""Signal handling for the daemons: handlers only record what arrived and
wake the main loop through a pipe; the main loop acts (as in Huey's
consumer), never the handler."""
import contextlib
import os
import select
import signal


class SignalFlags:
    def __init__(self):
        self.stop_requests = 0   # SIGTERM/SIGINT count: 2 = stop at once
        self.reload = False       # SIGHUP
        self.reopen = False       # SIGUSR1
        self.last_stop_signal = None
        self._r, self._w = os.pipe()
        os.set_blocking(self._r, False)
        os.set_blocking(self._w, False)

    def _on_stop(self, signum, frame):
        self.stop_requests += 1
        self.last_stop_signal = signum
        self._wake()

    def _on_reload(self, signum, frame):
        self.reload = True
        self._wake()

    def _on_reopen(self, signum, frame):
        self.reopen = True
        self._wake()

    def _wake(self):
        try:
            os.write(self._w, b'x')
        except (BlockingIOError, OSError):
            pass  # the pipe is full: the loop is awake already

    def wait(self, timeout):
        """Sleep up to `timeout` seconds, returning early on a signal."""
        try:
            ready, _, _ = select.select([self._r], [], [], max(0, timeout))
        except InterruptedError:
            ready = [self._r]
        if ready:
            try:
                while os.read(self._r, 512):
                    pass
            except (BlockingIOError, OSError):
                pass

    def close(self):
        for fd in (self._r, self._w):
            try:
                os.close(fd)
            except OSError:
                pass


@contextlib.contextmanager
def handled_signals():
    """Install the daemon handlers; restore the previous ones on exit."""
    flags = SignalFlags()
    wanted = {signal.SIGTERM: flags._on_stop, signal.SIGINT: flags._on_stop,
              signal.SIGHUP: flags._on_reload, signal.SIGUSR1: flags._on_reopen}
    previous = {sig: signal.signal(sig, handler)
                for sig, handler in wanted.items()}
    try:
        yield flags
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        flags.close()


def name(signum):
    try:
        return signal.Signals(signum).name
    except (ValueError, TypeError):
        return str(signum)

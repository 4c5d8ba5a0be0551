"""Imported only by multiprocessing's fork server: it exits when the runner that started it
dies, so a SIGKILLed sweep leaves no server (and, through PDEATHSIG, no trial) behind."""

import os
import threading
import time

_runner = os.getppid()


def _watch() -> None:
    while True:
        time.sleep(0.5)
        if os.getppid() != _runner:
            os._exit(0)


threading.Thread(target=_watch, daemon=True, name="peftbench-forkserver-guard").start()

"""SIGUSR2 makes a running Ember print its threads' stacks and carry on."""

import subprocess
import sys

SCRIPT = """
import os, threading, time
from ember import stackdump
stackdump.install()
worker = threading.Thread(target=time.sleep, args=(5,), name="vcpu0", daemon=True)
worker.start()
os.kill(os.getpid(), stackdump.STACK_DUMP_SIGNAL)
time.sleep(0.2)
print("still running")
"""


def test_the_signal_dumps_every_thread_and_the_process_goes_on():
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "still running"
    assert "Current thread 0x" in done.stderr and "line 7 in <module>" in done.stderr  # the main thread
    assert done.stderr.startswith("Thread 0x") and "in _bootstrap" in done.stderr  # and the worker

"""SIGUSR2 makes a running Ember print its threads' stacks and carry on."""

import subprocess
import sys

SCRIPT = """
import os, threading, time
from ember import stackdump
stackdump.install()
stackdump.install()  # a second install changes nothing
stackdump.add_report(lambda: "queue 0: avail idx 7 (device at 5)")
stackdump.add_report(lambda: 1 / 0)
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
    assert "Current thread 0x" in done.stderr and "line 10 in <module>" in done.stderr  # the main thread
    assert done.stderr.startswith("Thread 0x") and "in _bootstrap" in done.stderr  # and the worker
    stacks_end = done.stderr.index("line 10 in <module>")
    assert done.stderr.index("queue 0: avail idx 7 (device at 5)") > stacks_end  # the reports follow
    assert "(report failed: ZeroDivisionError" in done.stderr

"""``python -m benchmarks.load_harness SPECS.json``: fork the load clients (see :mod:`.launcher`)."""

import os
import sys

from benchmarks.load_harness.launcher import main

code = main(sys.argv[1])
sys.stdout.flush()
sys.stderr.flush()
os._exit(code)  # the launcher holds nothing to clean up; a normal exit with torch and hivemind loaded takes seconds

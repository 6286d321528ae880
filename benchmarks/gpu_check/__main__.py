"""``python -m benchmarks.gpu_check``: the device check (benchmarks/gpu_check/__init__.py)."""

import sys

from benchmarks.gpu_check.supervisor import main

sys.exit(main())

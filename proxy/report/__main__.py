"""``python -m proxy.report`` is ``proxy-report``."""

import sys

from proxy.report.build import main

sys.exit(main())

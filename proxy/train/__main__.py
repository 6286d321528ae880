"""``python -m proxy.train`` is ``proxy-train`` (what torchrun and the tests start)."""

from proxy.train.cli import main

main()

"""``python -m proxy.data``: the default synthetic language's figures (entropies in nats/token)."""

import json

from proxy.config import DataConfig
from proxy.data import build_source

print(json.dumps(build_source(DataConfig()).describe(), indent=2))

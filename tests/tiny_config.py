r"""`tests/tiny.py`'s config as a config file, for tests that drive the command line:

  python -m spectralmoe_jax.main --config tests/tiny_config.py --workdir /tmp/run --mode train
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.tiny import tiny_config  # noqa: E402


def get_config(variant=None):
    return tiny_config(variant or None)

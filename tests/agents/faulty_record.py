"""`oisp ...` with a fault planted in the reflector thread, for fail-open tests.

usage: faulty_record.py --trigger FILE record ARGS...
Once FILE exists, the reflector's once-a-second step raises RuntimeError, as an
unexpected bug would.
"""

import argparse
import os
import sys

from oisp.cli import main
from oisp.redirect.fast_mirror import FastMirror

parser = argparse.ArgumentParser(description="`oisp ...` with a fault planted in the reflector thread.")
parser.add_argument("--trigger", required=True, help="the reflector's periodic step raises once this file exists")
parser.add_argument("oisp_args", nargs=argparse.REMAINDER, help="the `oisp` command line, e.g. record -o FILE")
options = parser.parse_args()
trigger = options.trigger
take_touched = FastMirror.take_touched


def _take_touched(self, engine):
    if os.path.exists(trigger):
        raise RuntimeError("injected fault")
    return take_touched(self, engine)


FastMirror.take_touched = _take_touched
sys.exit(main(options.oisp_args))

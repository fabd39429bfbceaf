"""`oisp ...` with a fault planted in the reflector thread, for fail-open tests.

usage: faulty_record.py TRIGGER_FILE record ARGS...
Once TRIGGER_FILE exists, the reflector's once-a-second step raises RuntimeError, as an
unexpected bug would.
"""

import os
import sys

from oisp.cli import main
from oisp.redirect.fast_mirror import FastMirror

trigger = sys.argv.pop(1)
take_touched = FastMirror.take_touched


def _take_touched(self, engine):
    if os.path.exists(trigger):
        raise RuntimeError("injected fault")
    return take_touched(self, engine)


FastMirror.take_touched = _take_touched
sys.exit(main())

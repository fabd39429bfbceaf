import sys

from oisp.cli import main

sys.exit(main())

"""`python -m hope_kernels.cli ...`: the same as `hope-kernels ...`."""

import sys

from hope_kernels.cli import main

sys.exit(main())

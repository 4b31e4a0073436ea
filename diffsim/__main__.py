"""``python -m diffsim``: the same as the ``diffsim`` command."""

import sys

from diffsim.apps.cli import main

sys.exit(main())

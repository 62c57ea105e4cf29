"""``python -m convlora.bench run CONFIG...``: the same as ``convlora benchmark``."""

import sys

from .runner import main

sys.exit(main())

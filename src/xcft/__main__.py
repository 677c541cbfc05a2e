"""``python -m xcft``: the same as the ``xcft`` command."""

import sys

from xcft.cli import main

sys.exit(main())

"""``python -m xcft``: the same as the ``xcft`` command."""

import sys

from xcft.cli import main

if __name__ == "__main__":
    sys.exit(main())

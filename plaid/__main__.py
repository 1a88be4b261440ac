"""``python -m plaid``: the ``plaid`` command (see ``plaid --help``)."""
import sys

from .cli import main

sys.exit(main())

"""``python -m taskguard`` runs the ``taskguard`` command."""

import sys

from ._cli import main

sys.exit(main())

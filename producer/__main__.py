"""``python -P -m pipeq ...``: the ``pipeq`` command (``-P``: the current folder never
shadows an installed module)."""

import sys

from pipeq.ops.cli import main

sys.exit(main())

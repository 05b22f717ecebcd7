"""``python -m manatee_grpc`` is the ``manatee-grpc`` command."""

from __future__ import annotations

import sys

from .cli import main

sys.exit(main())

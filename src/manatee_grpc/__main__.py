"""``python -m manatee_grpc`` is the ``manatee-grpc`` command."""

from __future__ import annotations

import sys

from manatee_grpc.cli import main

sys.exit(main())

"""The operator command ``manatee-grpc``: ``serve``, ``sim``, the client subcommands and ``top``.

The parser and ``serve`` (``_main``), the client subcommands (``_cli_client``), ``top``
(``_top``, drawn by ``_top_view``) and what they share (``_common``). A subcommand imports what
it needs when it runs (``serve`` loads the server only then).

May import: anything in manatee_grpc; nothing imports cli but ``__main__`` (the contract in
pyproject.toml checks it).
"""

from __future__ import annotations

from manatee_grpc.cli._main import build_parser, main

__all__ = ["build_parser", "main"]

"""`python -m distattn.cli`: the `distattn` command, now in `distattn.frontends.cli` (kept for existing imports)."""

from .frontends.cli import build_parser, demo_checkpoint, main

__all__ = ["build_parser", "demo_checkpoint", "main"]

if __name__ == "__main__":
    raise SystemExit(main())

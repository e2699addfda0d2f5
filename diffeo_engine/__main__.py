"""``python -m diffeo_engine`` (and ``torchrun -m diffeo_engine``) runs the CLI."""

from diffeo_engine.cli import main

if __name__ == "__main__":
    raise SystemExit(main())

"""`python -m gpt2lite ...` is the `gpt2lite` command line."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())

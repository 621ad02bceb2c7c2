"""`python -m gpt2lite ...` is the `gpt2lite` command line."""

from gpt2lite.cli import main

if __name__ == "__main__":
    raise SystemExit(main())

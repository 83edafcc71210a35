"""``python -m layerfuse``: the same command line as the ``layerfuse`` script."""

from .cli.main import main

if __name__ == "__main__":
    raise SystemExit(main())

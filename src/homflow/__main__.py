"""``python -m homflow``: the command-line interface (the same as the ``homflow`` command)."""

from .cli import main

if __name__ == "__main__":  # pragma: no cover - the entry point
    main()

"""``python -m normfuse``: the command line."""

from normfuse.cli import main

if __name__ == "__main__":
    main()

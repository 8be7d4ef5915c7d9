"""``python -m normfuse``: the command line."""

from normfuse.entry import main

if __name__ == "__main__":
    main()

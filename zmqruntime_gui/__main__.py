"""``python -m zmqruntime_gui``: the same as the ``zmqruntime-gui`` command."""

from .app import main

if __name__ == "__main__":
    main()

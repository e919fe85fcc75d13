"""zmqruntime_gui: the desktop monitor and launcher of zmqruntime (PySide6 + pyqtgraph).

Start it with ``zmqruntime-gui`` (or ``python -m zmqruntime_gui``); ``--demo`` spawns a
local server if none answers and starts the acquisition example with live preview.

Layout: ``model`` (plain data, no Qt, no network), ``net`` (clients and probes, no
Qt), ``tasks`` (thread pool -> GUI thread), ``follower`` (the data-channel QThread),
``controller`` (state + actions), one module per panel, ``main_window`` and ``app``.
"""

from zmqruntime import __version__

__all__ = ["__version__"]

"""The live dashboard: a sink that keeps the last events in memory and serves them to a local web page.

:class:`UISink` is fed like every other sink; :class:`UIServer` serves a store of events
(the sink's, or one a :class:`Follower` fills from a JSONL file for ``oisp ui FILE``).
"""

from oisp.sinks.ui.server import DEFAULT_PORT, UIServer
from oisp.sinks.ui.sink import UISink
from oisp.sinks.ui.store import EventStore
from oisp.sinks.ui.tail import Follower

__all__ = ["DEFAULT_PORT", "EventStore", "Follower", "UIServer", "UISink"]

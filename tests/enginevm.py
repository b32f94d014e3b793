"""
The engine's test VMs moved to L{twisted_postcopy.testing.enginevm} (the
benchmarks share them); this module is kept so that existing imports work.
New code imports L{twisted_postcopy.testing.enginevm}.
"""

from twisted_postcopy.testing.enginevm import (  # noqa: F401
    PAGE, IncomingTestVM, MemBlock, OutgoingTestVM, WriteLog)

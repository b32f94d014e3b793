# -*- test-case-name: tests.test_source_machine -*-
"""
The migration status vocabulary, now in L{twisted_postcopy.state}; kept so
that existing imports work.  New code imports L{twisted_postcopy.state}.
"""

from twisted_postcopy.state import (  # noqa: F401
    FINISHED, INCOMING_TRANSITIONS, OUTGOING_TRANSITIONS, PAUSABLE, PAUSED_MESSAGE, POSTCOPY, MigrationStatus, S,
    StatusMachine, incomingMachine, outgoingMachine)

"""
Guests of our own: worker processes attached to the daemon's RAMBlocks.

C{attach} (protocol framing and the client library), C{session} (the
daemon's side of one attachment), C{host} (L{GuestHost}: spawning and run
control), C{worker} (the workers' request loop), C{guest} (L{Guest} and
L{IncomingGuest}, what the engine migrates), and the built-in guests
C{stress} and C{kv}.  See C{docs/attach.md} and C{docs/guests.md}.
"""

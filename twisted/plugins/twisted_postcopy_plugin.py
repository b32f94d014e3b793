"""
The C{twistd postcopy} plugin.  It imports only L{ServiceMaker}, so that a
broken build of the userfaultfd binding cannot break C{twistd --help}.
"""

from twisted.application.service import ServiceMaker

postcopy = ServiceMaker(
    "twisted-postcopy",
    "twisted_postcopy.tap",
    "Postcopy live migration daemon (QEMU 7.2 compatible), controlled over AMP.",
    "postcopy",
)

"""
cffi out-of-line API build of the userfaultfd binding (initial version; the
ram/ owner extends it).
"""

from cffi import FFI

ffibuilder = FFI()
ffibuilder.cdef(
    """
    int tp_uffd_open(int flags);
    """
)
ffibuilder.set_source(
    "twisted_postcopy.ram._uffd",
    """
    #include <unistd.h>
    #include <sys/syscall.h>
    static int tp_uffd_open(int flags) { return (int)syscall(__NR_userfaultfd, flags); }
    """,
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)

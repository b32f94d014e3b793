# -*- test-case-name: tests.test_ram_uffd -*-
"""
cffi out-of-line API build of the userfaultfd binding.

Python never builds an ioctl struct: each C shim below takes scalar
arguments (plus out-pointers for results) and returns C{-errno} on failure.
Constants come from the kernel UAPI headers where they exist; the distro's
6.1 headers predate C{WP_UNPOPULATED}, C{POISON}, C{WP_ASYNC}, C{MOVE} and
C{PAGEMAP_SCAN}, whose values are defined here (from the kernel's UAPI, see
C{shared/spec/userfaultfd.md} sections 2.1, 3 and 11.3) behind C{#ifndef}
guards.

Besides the uffd shims there are two helpers: C{tp_uffd_place}, which
places one contiguous run (one C{UFFDIO_COPY} or C{UFFDIO_ZEROPAGE} per
attempt, dealing with partial copies and C{EEXIST}), and C{tp_touch_pages},
which a I{guest-side} process (tests, bench) uses to fault pages in from C
with the GIL released, timestamping each touch with C{CLOCK_MONOTONIC}.
"""

from cffi import FFI

_CONSTANTS = """
#define UFFD_API ...
#define UFFD_USER_MODE_ONLY ...
#define USERFAULTFD_IOC_NEW ...
#define UFFD_EVENT_PAGEFAULT ...
#define UFFD_EVENT_FORK ...
#define UFFD_EVENT_REMAP ...
#define UFFD_EVENT_REMOVE ...
#define UFFD_EVENT_UNMAP ...
#define UFFD_PAGEFAULT_FLAG_WRITE ...
#define UFFD_PAGEFAULT_FLAG_WP ...
#define UFFD_PAGEFAULT_FLAG_MINOR ...
#define UFFD_FEATURE_PAGEFAULT_FLAG_WP ...
#define UFFD_FEATURE_EVENT_FORK ...
#define UFFD_FEATURE_EVENT_REMAP ...
#define UFFD_FEATURE_EVENT_REMOVE ...
#define UFFD_FEATURE_MISSING_HUGETLBFS ...
#define UFFD_FEATURE_MISSING_SHMEM ...
#define UFFD_FEATURE_EVENT_UNMAP ...
#define UFFD_FEATURE_SIGBUS ...
#define UFFD_FEATURE_THREAD_ID ...
#define UFFD_FEATURE_MINOR_HUGETLBFS ...
#define UFFD_FEATURE_MINOR_SHMEM ...
#define UFFD_FEATURE_EXACT_ADDRESS ...
#define UFFD_FEATURE_WP_HUGETLBFS_SHMEM ...
#define UFFD_FEATURE_WP_UNPOPULATED ...
#define UFFD_FEATURE_POISON ...
#define UFFD_FEATURE_WP_ASYNC ...
#define UFFD_FEATURE_MOVE ...
#define UFFDIO_REGISTER_MODE_MISSING ...
#define UFFDIO_REGISTER_MODE_WP ...
#define UFFDIO_REGISTER_MODE_MINOR ...
#define UFFDIO_COPY_MODE_DONTWAKE ...
#define UFFDIO_COPY_MODE_WP ...
#define UFFDIO_ZEROPAGE_MODE_DONTWAKE ...
#define UFFDIO_WRITEPROTECT_MODE_WP ...
#define UFFDIO_WRITEPROTECT_MODE_DONTWAKE ...
#define UFFDIO_CONTINUE_MODE_DONTWAKE ...
#define PM_SCAN_WP_MATCHING ...
#define PM_SCAN_CHECK_WPASYNC ...
#define PAGE_IS_WPALLOWED ...
#define PAGE_IS_WRITTEN ...
#define PAGE_IS_FILE ...
#define PAGE_IS_PRESENT ...
#define PAGE_IS_SWAPPED ...
#define PAGE_IS_PFNZERO ...
#define PAGE_IS_HUGE ...
#define MFD_CLOEXEC ...
#define MFD_HUGETLB ...
#define MAP_SHARED ...
#define MAP_PRIVATE ...
#define MAP_ANONYMOUS ...
#define MAP_HUGETLB ...
#define MADV_DONTNEED ...
#define MADV_NOHUGEPAGE ...
#define MADV_REMOVE ...
#define FALLOC_FL_PUNCH_HOLE ...
#define FALLOC_FL_KEEP_SIZE ...
static const int TP_UFFD_MSG_SIZE;
"""

_CDEF = _CONSTANTS + """
struct tp_page_region { uint64_t start; uint64_t end; uint64_t categories; };

int tp_uffd_open(int flags);
int tp_uffd_syscall(int flags);
int tp_uffd_dev_open(int flags);
int tp_uffd_api(int fd, uint64_t features, uint64_t *outFeatures, uint64_t *outIoctls);
int tp_uffd_register(int fd, uint64_t start, uint64_t len, uint64_t mode, uint64_t *outIoctls);
int tp_uffd_unregister(int fd, uint64_t start, uint64_t len);
int tp_uffd_wake(int fd, uint64_t start, uint64_t len);
int64_t tp_uffd_copy(int fd, uint64_t dst, uint64_t src, uint64_t len, uint64_t mode);
int64_t tp_uffd_zeropage(int fd, uint64_t start, uint64_t len, uint64_t mode);
int64_t tp_uffd_continue(int fd, uint64_t start, uint64_t len, uint64_t mode);
int tp_uffd_writeprotect(int fd, uint64_t start, uint64_t len, uint64_t mode);
int tp_uffd_read(int fd, char *buffer, int maxMessages);
int tp_uffd_place(int fd, uint64_t dst, uint64_t src, uint64_t len, uint64_t pageSize,
                  uint64_t mode, uint64_t *placed, uint64_t *existed);
int64_t tp_pagemap_scan(int fd, uint64_t start, uint64_t end, uint64_t flags,
                        struct tp_page_region *vec, uint64_t vecLen, uint64_t categoryMask,
                        uint64_t returnMask, uint64_t *walkEnd);

int64_t tp_mmap(int fd, uint64_t length, int flags);
int tp_munmap(uint64_t address, uint64_t length);
int tp_madvise(uint64_t address, uint64_t length, int advice);
int tp_punch_hole(int fd, uint64_t offset, uint64_t length);

int64_t tp_monotonic_ns(void);
int tp_touch_pages(uint64_t base, uint64_t stride, uint64_t count, int write,
                   int64_t *began, int64_t *ended, uint64_t *checksum);
"""

_SOURCE = r"""
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <linux/falloc.h>
#include <linux/userfaultfd.h>

#ifndef MFD_CLOEXEC
#define MFD_CLOEXEC 0x0001U
#endif
#ifndef MFD_HUGETLB
#define MFD_HUGETLB 0x0004U
#endif
#ifndef USERFAULTFD_IOC_NEW
#define USERFAULTFD_IOC_NEW _IO(0xAA, 0x00)
#endif
#ifndef UFFD_USER_MODE_ONLY
#define UFFD_USER_MODE_ONLY 1
#endif
#ifndef UFFD_FEATURE_EXACT_ADDRESS
#define UFFD_FEATURE_EXACT_ADDRESS (1 << 11)
#endif
#ifndef UFFD_FEATURE_WP_HUGETLBFS_SHMEM
#define UFFD_FEATURE_WP_HUGETLBFS_SHMEM (1 << 12)
#endif
#ifndef UFFD_FEATURE_WP_UNPOPULATED
#define UFFD_FEATURE_WP_UNPOPULATED (1 << 13)
#endif
#ifndef UFFD_FEATURE_POISON
#define UFFD_FEATURE_POISON (1 << 14)
#endif
#ifndef UFFD_FEATURE_WP_ASYNC
#define UFFD_FEATURE_WP_ASYNC (1 << 15)
#endif
#ifndef UFFD_FEATURE_MOVE
#define UFFD_FEATURE_MOVE (1 << 16)
#endif
#ifndef PAGEMAP_SCAN
#define PAGEMAP_SCAN 0xC0606610UL
#define PM_SCAN_WP_MATCHING (1 << 0)
#define PM_SCAN_CHECK_WPASYNC (1 << 1)
#define PAGE_IS_WPALLOWED (1 << 0)
#define PAGE_IS_WRITTEN (1 << 1)
#define PAGE_IS_FILE (1 << 2)
#define PAGE_IS_PRESENT (1 << 3)
#define PAGE_IS_SWAPPED (1 << 4)
#define PAGE_IS_PFNZERO (1 << 5)
#define PAGE_IS_HUGE (1 << 6)
#endif

static const int TP_UFFD_MSG_SIZE = sizeof(struct uffd_msg);

struct tp_page_region { uint64_t start; uint64_t end; uint64_t categories; };
struct tp_pm_scan_arg {
    uint64_t size, flags, start, end, walk_end, vec, vec_len, max_pages;
    uint64_t category_inverted, category_mask, category_anyof_mask, return_mask;
};

static int tp_uffd_syscall(int flags) {
    int fd = (int)syscall(__NR_userfaultfd, flags);
    return fd < 0 ? -errno : fd;
}

static int tp_uffd_dev_open(int flags) {
    int dev = open("/dev/userfaultfd", O_RDWR | O_CLOEXEC);
    if (dev < 0) return -errno;
    int fd = ioctl(dev, USERFAULTFD_IOC_NEW, flags);
    int saved = errno;
    close(dev);
    return fd < 0 ? -saved : fd;
}

/* The system call first; /dev/userfaultfd when it is refused.  The
   system call's error is reported when both fail (it names privilege). */
static int tp_uffd_open(int flags) {
    int fd = tp_uffd_syscall(flags);
    if (fd >= 0) return fd;
    int dev = tp_uffd_dev_open(flags);
    return dev >= 0 ? dev : fd;
}

static int tp_uffd_api(int fd, uint64_t features, uint64_t *outFeatures, uint64_t *outIoctls) {
    struct uffdio_api api = { .api = UFFD_API, .features = features };
    if (ioctl(fd, UFFDIO_API, &api) < 0) return -errno;
    *outFeatures = api.features;
    *outIoctls = api.ioctls;
    return 0;
}

static int tp_uffd_register(int fd, uint64_t start, uint64_t len, uint64_t mode, uint64_t *outIoctls) {
    struct uffdio_register reg = { .range = { start, len }, .mode = mode };
    if (ioctl(fd, UFFDIO_REGISTER, &reg) < 0) return -errno;
    *outIoctls = reg.ioctls;
    return 0;
}

static int tp_uffd_unregister(int fd, uint64_t start, uint64_t len) {
    struct uffdio_range range = { start, len };
    return ioctl(fd, UFFDIO_UNREGISTER, &range) < 0 ? -errno : 0;
}

static int tp_uffd_wake(int fd, uint64_t start, uint64_t len) {
    struct uffdio_range range = { start, len };
    return ioctl(fd, UFFDIO_WAKE, &range) < 0 ? -errno : 0;
}

/* Result: bytes copied, or -errno when nothing was copied. */
static int64_t tp_uffd_copy(int fd, uint64_t dst, uint64_t src, uint64_t len, uint64_t mode) {
    struct uffdio_copy copy = { .dst = dst, .src = src, .len = len, .mode = mode };
    if (ioctl(fd, UFFDIO_COPY, &copy) == 0) return copy.copy;
    int saved = errno;
    return copy.copy > 0 ? copy.copy : -saved;
}

static int64_t tp_uffd_zeropage(int fd, uint64_t start, uint64_t len, uint64_t mode) {
    struct uffdio_zeropage zero = { .range = { start, len }, .mode = mode };
    if (ioctl(fd, UFFDIO_ZEROPAGE, &zero) == 0) return zero.zeropage;
    int saved = errno;
    return zero.zeropage > 0 ? zero.zeropage : -saved;
}

static int64_t tp_uffd_continue(int fd, uint64_t start, uint64_t len, uint64_t mode) {
    struct uffdio_continue cont = { .range = { start, len }, .mode = mode };
    if (ioctl(fd, UFFDIO_CONTINUE, &cont) == 0) return cont.mapped;
    int saved = errno;
    return cont.mapped > 0 ? cont.mapped : -saved;
}

static int tp_uffd_writeprotect(int fd, uint64_t start, uint64_t len, uint64_t mode) {
    struct uffdio_writeprotect wp = { .range = { start, len }, .mode = mode };
    return ioctl(fd, UFFDIO_WRITEPROTECT, &wp) < 0 ? -errno : 0;
}

/* Read up to maxMessages uffd_msg records; returns the count or -errno. */
static int tp_uffd_read(int fd, char *buffer, int maxMessages) {
    ssize_t got = read(fd, buffer, (size_t)maxMessages * sizeof(struct uffd_msg));
    if (got < 0) return -errno;
    return (int)(got / (ssize_t)sizeof(struct uffd_msg));
}

/* Place one contiguous run [dst, dst+len): COPY from src, or ZEROPAGE when
   src is 0.  A partial copy resumes after the copied bytes; a page that
   already exists (EEXIST) counts as placed and is skipped.  Stops with
   -EAGAIN when a non-cooperative event must be read first, or -errno on
   another failure; *placed says how many bytes from dst are done (placed
   or already present) and *existed how many of those already existed. */
static int tp_uffd_place(int fd, uint64_t dst, uint64_t src, uint64_t len, uint64_t pageSize,
                         uint64_t mode, uint64_t *placed, uint64_t *existed) {
    uint64_t done = 0;
    *existed = 0;
    while (done < len) {
        int64_t result = src
            ? tp_uffd_copy(fd, dst + done, src + done, len - done, mode)
            : tp_uffd_zeropage(fd, dst + done, len - done, mode);
        if (result > 0) {
            done += (uint64_t)result;
        } else if (result == -EEXIST) {
            done += pageSize;
            *existed += pageSize;
        } else {
            *placed = done;
            return result == 0 ? -EAGAIN : (int)result;
        }
    }
    *placed = done;
    return 0;
}

static int64_t tp_pagemap_scan(int fd, uint64_t start, uint64_t end, uint64_t flags,
                               struct tp_page_region *vec, uint64_t vecLen, uint64_t categoryMask,
                               uint64_t returnMask, uint64_t *walkEnd) {
    struct tp_pm_scan_arg arg;
    memset(&arg, 0, sizeof arg);
    arg.size = sizeof arg;
    arg.flags = flags;
    arg.start = start;
    arg.end = end;
    arg.vec = (uint64_t)(uintptr_t)vec;
    arg.vec_len = vecLen;
    arg.category_mask = categoryMask;
    arg.return_mask = returnMask;
    long n = ioctl(fd, PAGEMAP_SCAN, &arg);
    *walkEnd = arg.walk_end;
    return n < 0 ? -errno : n;
}

static int64_t tp_mmap(int fd, uint64_t length, int flags) {
    void *p = mmap(NULL, length, PROT_READ | PROT_WRITE, flags, fd, 0);
    return p == MAP_FAILED ? -errno : (int64_t)(uintptr_t)p;
}

static int tp_munmap(uint64_t address, uint64_t length) {
    return munmap((void *)(uintptr_t)address, length) < 0 ? -errno : 0;
}

static int tp_madvise(uint64_t address, uint64_t length, int advice) {
    return madvise((void *)(uintptr_t)address, length, advice) < 0 ? -errno : 0;
}

static int tp_punch_hole(int fd, uint64_t offset, uint64_t length) {
    return fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) < 0 ? -errno : 0;
}

static int64_t tp_monotonic_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* Guest side only: touch one byte of each of count pages (base + i*stride),
   reading (or writing when write is set), with each touch's start and end
   times; checksum accumulates the bytes read. */
static int tp_touch_pages(uint64_t base, uint64_t stride, uint64_t count, int write,
                          int64_t *began, int64_t *ended, uint64_t *checksum) {
    uint64_t sum = 0;
    for (uint64_t i = 0; i < count; i++) {
        volatile unsigned char *p = (volatile unsigned char *)(uintptr_t)(base + i * stride);
        if (began) began[i] = tp_monotonic_ns();
        if (write) *p = (unsigned char)(i + 1); else sum += *p;
        if (ended) ended[i] = tp_monotonic_ns();
    }
    *checksum = sum;
    return 0;
}
"""

ffibuilder = FFI()
ffibuilder.cdef(_CDEF)
ffibuilder.set_source("twisted_postcopy.ram._uffd", _SOURCE)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)

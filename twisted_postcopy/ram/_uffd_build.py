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

The RAM record hot loops of both sides are here too (C{tp_buffer_is_zero},
QEMU's zero-page test; C{tp_ram_encode}, the records of a run of guest
pages with their zero detection; C{tp_ram_scan}, the decoder's scan of a
run of CONTINUE records): see L{twisted_postcopy.wire.ram}.

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

int tp_buffer_is_zero(const char *buffer, uint64_t length);
int64_t tp_ram_scan(const char *buffer, uint64_t length, uint64_t blockLength, uint64_t maxRecords,
                    uint64_t *words, uint32_t *payloads, uint64_t *consumed);
int64_t tp_ram_encode(const char *base, uint64_t start, uint64_t count, char *out,
                      uint32_t *splits, uint32_t *pages, uint64_t *written);
int tp_write_records(int fd, const char *data, uint64_t dataLength, const uint64_t *words,
                     const uint32_t *payloads, uint64_t first, uint64_t count, uint64_t blockLength,
                     uint64_t *runs, uint64_t maxRuns, uint64_t *runCount, uint64_t *next, uint64_t *zeroCount);
int64_t tp_record_runs(const char *data, uint64_t dataLength, const uint64_t *words, const uint32_t *payloads,
                       uint64_t first, uint64_t count, uint64_t *runs, uint64_t maxRuns, uint64_t *next);
int tp_uffd_place_records(int fd, uint64_t dst, const char *data, uint64_t dataLength,
                          const uint32_t *payloads, uint64_t first, uint64_t count, uint64_t *placed);

int64_t tp_monotonic_ns(void);
int tp_touch_pages(uint64_t base, uint64_t stride, uint64_t count, int write,
                   int64_t *began, int64_t *ended, uint64_t *checksum);
"""

_SOURCE = r"""
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/uio.h>
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

/* RAM records (migration/ram.c): the hot loops of both sides. */
#define TP_TARGET_PAGE 4096u
#define TP_FLAGS_MASK ((uint64_t)TP_TARGET_PAGE - 1)
#define TP_ZERO 0x02u
#define TP_PAGE 0x08u
#define TP_CONTINUE 0x20u
/* Offsets into a scanned buffer are 32-bit: longer buffers are scanned in part. */
#define TP_SCAN_MAX ((uint64_t)1 << 31)

/* QEMU's buffer_is_zero: whether length bytes are all zero.  The first and
   last words are checked first (most non-zero pages differ there), then
   whole 64-byte blocks with an early exit. */
static int tp_buffer_is_zero(const char *buffer, uint64_t length) {
    const unsigned char *p = (const unsigned char *)buffer;
    if (length < 64) {
        unsigned char acc = 0;
        for (uint64_t i = 0; i < length; i++) acc |= p[i];
        return acc == 0;
    }
    uint64_t head, tail;
    memcpy(&head, p, 8);
    memcpy(&tail, p + length - 8, 8);
    if (head | tail) return 0;
    uint64_t i = 8;
    for (; i + 64 <= length; i += 64) {
        uint64_t w[8];
        memcpy(w, p + i, 64);
        if (w[0] | w[1] | w[2] | w[3] | w[4] | w[5] | w[6] | w[7]) return 0;
    }
    unsigned char acc = 0;
    for (; i < length; i++) acc |= p[i];
    return acc == 0;
}

static uint64_t tp_be64(const unsigned char *p) {
    uint64_t v;
    memcpy(&v, p, 8);
    return __builtin_bswap64(v);
}

static void tp_put_be64(unsigned char *p, uint64_t v) {
    v = __builtin_bswap64(v);
    memcpy(p, &v, 8);
}

/* Decode side: scan the CONTINUE records (PAGE with 4096 bytes, ZERO with
   its fill byte) at the start of buffer, up to maxRecords.  Stops before a
   record that is incomplete, of any other kind, or whose offset is not
   below blockLength (the caller decodes that one and names the error).
   words[i]: record i's word (offset | flags); payloads[i]: where its page
   or fill byte starts in buffer; *consumed: the bytes of the scanned
   records.  Returns how many records were scanned. */
static int64_t tp_ram_scan(const char *buffer, uint64_t length, uint64_t blockLength, uint64_t maxRecords,
                           uint64_t *words, uint32_t *payloads, uint64_t *consumed) {
    const unsigned char *p = (const unsigned char *)buffer;
    uint64_t at = 0, n = 0;
    if (length > TP_SCAN_MAX) length = TP_SCAN_MAX;
    while (n < maxRecords && length - at >= 8) {
        uint64_t word = tp_be64(p + at);
        uint64_t flags = word & TP_FLAGS_MASK, size;
        if (flags == (TP_PAGE | TP_CONTINUE)) size = 8 + TP_TARGET_PAGE;
        else if (flags == (TP_ZERO | TP_CONTINUE)) size = 9;
        else break;
        if (length - at < size || word - flags >= blockLength) break;
        words[n] = word;
        payloads[n] = (uint32_t)(at + 8);
        n++;
        at += size;
    }
    *consumed = at;
    return (int64_t)n;
}

/* Encode side: the CONTINUE records of count target pages from
   base + start (a block's memory; start page aligned).  An all-zero page
   becomes a ZERO record (word and fill byte), any other a PAGE record
   whose 4096 bytes are NOT copied: out receives the stream's bytes between
   page data, splits[k] is where the k-th page's data goes in out (after
   its word) and pages[k] that page's index in the run.  out must hold
   9 * count bytes; *written says how many were used.  Returns the number
   of PAGE records, or -EINVAL for an unaligned start. */
static int64_t tp_ram_encode(const char *base, uint64_t start, uint64_t count, char *out,
                             uint32_t *splits, uint32_t *pages, uint64_t *written) {
    unsigned char *o = (unsigned char *)out;
    uint64_t at = 0, n = 0;
    *written = 0;
    if (start & TP_FLAGS_MASK) return -EINVAL;
    if (count > TP_SCAN_MAX / 9) return -EINVAL;
    for (uint64_t i = 0; i < count; i++) {
        uint64_t offset = start + i * TP_TARGET_PAGE;
        if (tp_buffer_is_zero(base + offset, TP_TARGET_PAGE)) {
            tp_put_be64(o + at, offset | TP_ZERO | TP_CONTINUE);
            o[at + 8] = 0;
            at += 9;
        } else {
            tp_put_be64(o + at, offset | TP_PAGE | TP_CONTINUE);
            at += 8;
            splits[n] = (uint32_t)at;
            pages[n] = (uint32_t)i;
            n++;
        }
    }
    *written = at;
    return (int64_t)n;
}

/* Whether each record from first to count lies inside the dataLength
   bytes of data (its page, or its fill byte): the loops below read only
   there, whoever built the arrays. */
static int tp_records_fit(uint64_t dataLength, const uint64_t *words, const uint32_t *payloads,
                          uint64_t first, uint64_t count) {
    for (uint64_t i = first; i < count; i++) {
        uint64_t need = (words[i] & TP_PAGE) ? TP_TARGET_PAGE : 1;
        if ((uint64_t)payloads[i] + need > dataLength) return 0;
    }
    return 1;
}

/* Destination, precopy: write the records tp_ram_scan found (words,
   payloads into data) from index first into a block's memfd, straight
   from data: each run of PAGE records with consecutive offsets is one
   pwritev (up to TP_IOV_MAX pages; a short write is resumed).  runs gets
   (offset, length) of each run written (at most maxRuns; *runCount says
   how many).  Stops at a ZERO record, or at the end: *next is the index
   of the first record not written, and for a ZERO record *zeroCount says
   how many ZERO records with fill 0 and consecutive offsets start there
   (0 when its fill byte is not 0).  Returns 0, -ERANGE for a page past
   blockLength (*next at it), -EINVAL (nothing done) when a record does
   not lie inside the dataLength bytes of data, or -errno of a failed
   write (*next at the run, which may be partly written). */
#define TP_IOV_MAX 1024
static int tp_write_records(int fd, const char *data, uint64_t dataLength, const uint64_t *words,
                            const uint32_t *payloads, uint64_t first, uint64_t count, uint64_t blockLength,
                            uint64_t *runs, uint64_t maxRuns, uint64_t *runCount, uint64_t *next,
                            uint64_t *zeroCount) {
    struct iovec iov[TP_IOV_MAX];
    uint64_t i = first, n = 0;
    *runCount = 0;
    *zeroCount = 0;
    *next = first;
    if (!tp_records_fit(dataLength, words, payloads, first, count)) return -EINVAL;
    while (i < count && n < maxRuns) {
        uint64_t flags = words[i] & TP_FLAGS_MASK;
        if (!(flags & TP_PAGE)) break;
        uint64_t start = words[i] - flags, length = 0, j = i;
        while (j < count && j - i < TP_IOV_MAX) {
            uint64_t f = words[j] & TP_FLAGS_MASK;
            if (!(f & TP_PAGE) || words[j] - f != start + length) break;
            if (start + length + TP_TARGET_PAGE > blockLength) {
                if (j == i) { *next = i; return -ERANGE; }
                break;
            }
            iov[j - i].iov_base = (void *)(data + payloads[j]);
            iov[j - i].iov_len = TP_TARGET_PAGE;
            length += TP_TARGET_PAGE;
            j++;
        }
        struct iovec *at = iov;
        int left = (int)(j - i);
        uint64_t position = start;
        while (left > 0) {
            ssize_t written = pwritev(fd, at, left, (off_t)position);
            if (written < 0) {
                if (errno == EINTR) continue;
                *next = i;
                return -errno;
            }
            position += (uint64_t)written;
            while (left > 0 && (size_t)written >= at->iov_len) {
                written -= (ssize_t)at->iov_len;
                at++;
                left--;
            }
            if (left > 0 && written > 0) {
                at->iov_base = (char *)at->iov_base + written;
                at->iov_len -= (size_t)written;
            }
        }
        runs[2 * n] = start;
        runs[2 * n + 1] = length;
        n++;
        *runCount = n;
        i = j;
    }
    *next = i;
    if (i < count && !(words[i] & TP_PAGE)) {
        uint64_t start = words[i] & ~TP_FLAGS_MASK, j = i;
        while (j < count && (words[j] & TP_FLAGS_MASK) == (TP_ZERO | TP_CONTINUE)
               && words[j] - (TP_ZERO | TP_CONTINUE) == start + (j - i) * TP_TARGET_PAGE
               && data[payloads[j]] == 0)
            j++;
        *zeroCount = j - i;
    }
    return 0;
}

/* The runs of the records tp_ram_scan found, from index first: records
   with consecutive offsets and the same kind (1: PAGE, 0: ZERO with fill
   0, 2: ZERO with another fill, always a run of its own).  runs gets
   (offset, length, index of its first record, kind) for each, at most
   maxRuns; *next is the index after the last run.  Returns the number of
   runs, or -EINVAL when a record does not lie inside the dataLength bytes
   of data. */
static int64_t tp_record_runs(const char *data, uint64_t dataLength, const uint64_t *words,
                              const uint32_t *payloads, uint64_t first, uint64_t count, uint64_t *runs,
                              uint64_t maxRuns, uint64_t *next) {
    uint64_t i = first, n = 0;
    *next = first;
    if (!tp_records_fit(dataLength, words, payloads, first, count)) return -EINVAL;
    while (i < count && n < maxRuns) {
        uint64_t flags = words[i] & TP_FLAGS_MASK, start = words[i] - flags;
        uint64_t kind = (flags & TP_PAGE) ? 1 : (data[payloads[i]] ? 2 : 0), j = i + 1;
        if (kind != 2) {
            while (j < count) {
                uint64_t f = words[j] & TP_FLAGS_MASK;
                uint64_t k = (f & TP_PAGE) ? 1 : (data[payloads[j]] ? 2 : 0);
                if (k != kind || words[j] - f != start + (j - i) * TP_TARGET_PAGE) break;
                j++;
            }
        }
        runs[4 * n] = start;
        runs[4 * n + 1] = (j - i) * TP_TARGET_PAGE;
        runs[4 * n + 2] = i;
        runs[4 * n + 3] = kind;
        n++;
        i = j;
    }
    *next = i;
    return (int64_t)n;
}

/* Postcopy: place count PAGE records (index first on, consecutive
   offsets from dst) straight from data, one UFFDIO_COPY per page (the
   host page); a page that exists already (EEXIST) counts as placed.
   Stops at another error (-EAGAIN: events must be read first); *placed
   says how many pages are done.  -EINVAL (nothing placed) when a page
   does not lie inside the dataLength bytes of data. */
/* Pages gathered per UFFDIO_COPY by tp_uffd_place_records. */
#define TP_PLACE_CHUNK 16

/* Place count PAGE records (their pages at data + payloads[i]) at dst:
   the pages of up to TP_PLACE_CHUNK consecutive records are gathered into
   one aligned buffer (a memcpy) and placed with one UFFDIO_COPY, instead
   of one ioctl per 4 KiB page.  A page already present (EEXIST) counts as
   placed, as before.  *placed says how many pages were placed. */
static int tp_uffd_place_records(int fd, uint64_t dst, const char *data, uint64_t dataLength,
                                 const uint32_t *payloads, uint64_t first, uint64_t count, uint64_t *placed) {
    static __thread char *gathered = NULL;
    uint64_t done = 0;
    *placed = 0;
    for (uint64_t i = first; i < first + count; i++)
        if ((uint64_t)payloads[i] + TP_TARGET_PAGE > dataLength) return -EINVAL;
    if (gathered == NULL) {
        void *buffer = NULL;
        if (posix_memalign(&buffer, TP_TARGET_PAGE, TP_PLACE_CHUNK * TP_TARGET_PAGE) != 0) return -ENOMEM;
        gathered = buffer;
    }
    while (done < count) {
        uint64_t n = count - done;
        if (n > TP_PLACE_CHUNK) n = TP_PLACE_CHUNK;
        for (uint64_t j = 0; j < n; j++)
            memcpy(gathered + j * TP_TARGET_PAGE, data + payloads[first + done + j], TP_TARGET_PAGE);
        int64_t result = tp_uffd_copy(fd, dst + done * TP_TARGET_PAGE, (uint64_t)(uintptr_t)gathered,
                                      n * TP_TARGET_PAGE, 0);
        if (result > 0) {
            done += (uint64_t)result / TP_TARGET_PAGE;
        } else if (result == -EEXIST) {
            done++;
        } else {
            *placed = done;
            return result == 0 ? -EAGAIN : (int)result;
        }
    }
    *placed = done;
    return 0;
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

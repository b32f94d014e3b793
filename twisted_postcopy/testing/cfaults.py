"""
A C userfaultfd fault handler: the baseline of C{bench/faults.py}.

It has the shape of the production fault service
(L{twisted_postcopy.ram.faults.FaultService} with an in-process page
source), written as a small C program built at run time with C{gcc}:

  - the handler process maps a memfd, registers I{its own} mapping
    (MISSING) on I{its own} userfaultfd, and places pages there with
    C{UFFDIO_COPY};
  - another process (forked) maps the same memfd, registers its mapping on
    its own userfaultfd and hands that descriptor over a Unix socket
    (C{SCM_RIGHTS}), like a guest process attaching to the daemon; its
    threads touch the pages (thread C{k} every C{threads}-th page, as the
    guest worker's C{touch} command), timing each touch to its resume with
    C{CLOCK_MONOTONIC};
  - the handler polls the client's userfaultfd, reads fault messages in
    batches, places each missing page with one C{UFFDIO_COPY} (an
    C{EEXIST} counts as placed) and wakes the client with C{UFFDIO_WAKE}.

What it leaves out, on purpose, is what makes ours a service: the page
request to a page source, page state bitmaps, several clients and blocks.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from typing import Any

#: The C program (argv: pages, threads; prints one latency in ns per line).
SOURCE = r"""
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <linux/userfaultfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>

#define PAGE 4096
#define BATCH 16

static int64_t now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static int openUffd(void) {
    int fd = (int)syscall(__NR_userfaultfd, O_CLOEXEC);
    if (fd < 0) { perror("userfaultfd"); exit(2); }
    struct uffdio_api api = { .api = UFFD_API, .features = 0 };
    if (ioctl(fd, UFFDIO_API, &api) < 0) { perror("UFFDIO_API"); exit(2); }
    return fd;
}

static void registerRange(int fd, char *base, size_t length) {
    struct uffdio_register reg = { .range = { (uint64_t)(uintptr_t)base, length },
                                   .mode = UFFDIO_REGISTER_MODE_MISSING };
    if (ioctl(fd, UFFDIO_REGISTER, &reg) < 0) { perror("UFFDIO_REGISTER"); exit(2); }
}

struct toucher { char *base; long first, step, pages; int64_t *latencies; };

static void *touch(void *arg) {
    struct toucher *t = arg;
    unsigned sum = 0;
    for (long i = t->first; i < t->pages; i += t->step) {
        int64_t began = now();
        sum += *(volatile unsigned char *)(t->base + (size_t)i * PAGE);
        t->latencies[i] = now() - began;
    }
    return (void *)(uintptr_t)sum;
}

int main(int argc, char **argv) {
    if (argc != 3) { fprintf(stderr, "usage: %s PAGES THREADS\n", argv[0]); return 2; }
    long pages = atol(argv[1]), threads = atol(argv[2]);
    if (pages <= 0 || threads <= 0 || threads > 1024) { fprintf(stderr, "bad arguments\n"); return 2; }
    size_t length = (size_t)pages * PAGE;
    int memfd = memfd_create("cfaults", MFD_CLOEXEC);
    if (memfd < 0 || ftruncate(memfd, length) < 0) { perror("memfd"); return 2; }
    char *daemon = mmap(NULL, length, PROT_READ | PROT_WRITE, MAP_SHARED, memfd, 0);
    int64_t *latencies = mmap(NULL, pages * sizeof(int64_t), PROT_READ | PROT_WRITE,
                              MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (daemon == MAP_FAILED || latencies == MAP_FAILED) { perror("mmap"); return 2; }
    int placement = openUffd();
    registerRange(placement, daemon, length);
    char *source = malloc(PAGE);
    for (int i = 0; i < PAGE; i++) source[i] = (char)(i * 7 + 1);
    int pair[2];
    if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, pair) < 0) { perror("socketpair"); return 2; }

    pid_t child = fork();
    if (child == 0) {
        /* The guest: its own mapping and userfaultfd, handed over. */
        close(pair[0]);
        char *base = mmap(NULL, length, PROT_READ | PROT_WRITE, MAP_SHARED, memfd, 0);
        if (base == MAP_FAILED) { perror("mmap"); _exit(2); }
        int fd = openUffd();
        registerRange(fd, base, length);
        char control[CMSG_SPACE(sizeof(int))];
        memset(control, 0, sizeof control);
        struct iovec iov = { .iov_base = &base, .iov_len = sizeof base };
        struct msghdr msg = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = control,
                              .msg_controllen = sizeof control };
        struct cmsghdr *cmsg = CMSG_FIRSTHDR(&msg);
        cmsg->cmsg_level = SOL_SOCKET;
        cmsg->cmsg_type = SCM_RIGHTS;
        cmsg->cmsg_len = CMSG_LEN(sizeof(int));
        memcpy(CMSG_DATA(cmsg), &fd, sizeof(int));
        if (sendmsg(pair[1], &msg, 0) < 0) { perror("sendmsg"); _exit(2); }
        close(fd);
        char go;
        if (read(pair[1], &go, 1) != 1) _exit(2);
        pthread_t ids[1024];
        struct toucher args[1024];
        for (long k = 0; k < threads; k++) {
            args[k] = (struct toucher){ base, k, threads, pages, latencies };
            pthread_create(&ids[k], NULL, touch, &args[k]);
        }
        for (long k = 0; k < threads; k++) pthread_join(ids[k], NULL);
        _exit(0);
    }

    /* The handler. */
    close(pair[1]);
    char *clientBase;
    char control[CMSG_SPACE(sizeof(int))];
    struct iovec iov = { .iov_base = &clientBase, .iov_len = sizeof clientBase };
    struct msghdr msg = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = control,
                          .msg_controllen = sizeof control };
    if (recvmsg(pair[0], &msg, 0) != sizeof clientBase) { perror("recvmsg"); return 2; }
    int client;
    memcpy(&client, CMSG_DATA(CMSG_FIRSTHDR(&msg)), sizeof(int));
    fcntl(client, F_SETFL, fcntl(client, F_GETFL) | O_NONBLOCK);
    if (write(pair[0], "g", 1) != 1) return 2;
    struct uffd_msg messages[BATCH];
    int status, exited = 0;
    while (!exited) {
        struct pollfd p = { .fd = client, .events = POLLIN };
        int ready = poll(&p, 1, 50);
        if (ready <= 0) {
            exited = waitpid(child, &status, WNOHANG) == child;
            continue;
        }
        for (;;) {
            ssize_t got = read(client, messages, sizeof messages);
            if (got <= 0) break;
            for (int i = 0; i < got / (ssize_t)sizeof(struct uffd_msg); i++) {
                if (messages[i].event != UFFD_EVENT_PAGEFAULT) continue;
                uint64_t address = messages[i].arg.pagefault.address & ~(uint64_t)(PAGE - 1);
                uint64_t offset = address - (uint64_t)(uintptr_t)clientBase;
                struct uffdio_copy copy = { .dst = (uint64_t)(uintptr_t)daemon + offset,
                                            .src = (uint64_t)(uintptr_t)source, .len = PAGE };
                if (ioctl(placement, UFFDIO_COPY, &copy) < 0 && errno != EEXIST) {
                    perror("UFFDIO_COPY"); return 2;
                }
                struct uffdio_range range = { address, PAGE };
                if (ioctl(client, UFFDIO_WAKE, &range) < 0) { perror("UFFDIO_WAKE"); return 2; }
            }
        }
    }
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) { fprintf(stderr, "guest failed\n"); return 2; }
    for (long i = 0; i < pages; i++) printf("%lld\n", (long long)latencies[i]);
    return 0;
}
"""


def build(directory: str) -> str:
    """
    Compile the handler (once per source text) with C{gcc -O2}.

    @param directory: where the binary goes (created if needed).
    @return: the binary's path.
    @raise RuntimeError: no C{gcc}, or it failed (its output in the message).
    """
    compiler = shutil.which("gcc") or shutil.which("cc")
    if compiler is None:
        raise RuntimeError("no C compiler (gcc) to build the C fault handler")
    os.makedirs(directory, exist_ok=True)
    digest = hashlib.sha256(SOURCE.encode()).hexdigest()[:16]
    binary = os.path.join(directory, f"cfaults-{digest}")
    if os.path.exists(binary):
        return binary
    source = binary + ".c"
    with open(source, "w") as file:
        file.write(SOURCE)
    result = subprocess.run([compiler, "-O2", "-pthread", "-o", binary + ".tmp", source],
                            capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"building the C fault handler failed: {result.stderr.strip()}")
    os.replace(binary + ".tmp", binary)
    return binary


def faultLatencies(binary: str, pages: int, threads: int, timeout: float = 120) -> list[int]:
    """
    Run the C handler once: a guest process of C{threads} threads faults
    C{pages} pages, the handler places them.

    @param binary: from L{build}.
    @param pages: pages touched.
    @param threads: touching threads.
    @param timeout: seconds before the run is killed.
    @return: the round trip of each touch in ns, by page.
    @raise RuntimeError: the program failed (its stderr in the message).
    """
    result = subprocess.run([binary, str(pages), str(threads)], capture_output=True, text=True,
                            timeout=timeout)
    if result.returncode:
        raise RuntimeError(f"C fault handler failed ({result.returncode}): {result.stderr.strip()}")
    latencies: list[Any] = [int(line) for line in result.stdout.split()]
    if len(latencies) != pages:
        raise RuntimeError(f"C fault handler reported {len(latencies)} latencies for {pages} pages")
    return latencies

/* ftvm's dirty-page tracking shim, loaded into a level 3 QEMU with LD_PRELOAD
 * (l3/writes.py builds it, the agent sets LD_PRELOAD and FTVM_UFFD_FD).
 *
 * A userfaultfd belongs to the memory of the process that creates it, so the one that
 * tracks QEMU's guest RAM must be created inside QEMU. This constructor creates it,
 * before QEMU's main() and its seccomp sandbox, in write-protect ASYNC mode: the kernel
 * resolves every write fault itself and only records that the page was written, so
 * QEMU never waits on anyone, even if the agent dies. The agent later takes a copy of
 * the descriptor (pidfd_getfd), registers the RAM mapping through it and, once per
 * checkpoint, asks the kernel which pages were written (PAGEMAP_SCAN).
 *
 * It does nothing else: no thread, no handler, no change to QEMU. Without
 * FTVM_UFFD_FD in the environment it does nothing at all. USER_MODE_ONLY: the user QEMU
 * runs as may create no other kind (vm.unprivileged_userfaultfd = 0); in async mode
 * writes from the kernel (a disk read into guest RAM) are recorded all the same. */
#define _GNU_SOURCE
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <unistd.h>

#ifndef UFFD_USER_MODE_ONLY
#define UFFD_USER_MODE_ONLY 1
#endif
/* not in Debian 12's 6.1 uapi headers: the kernel's ABI values */
#define FEATURE_WP_HUGETLBFS_SHMEM (1ULL << 12)
#define FEATURE_WP_UNPOPULATED (1ULL << 13)
#define FEATURE_WP_ASYNC (1ULL << 15)

__attribute__((constructor)) static void ftvm_uffd_create(void) {
    const char *want = getenv("FTVM_UFFD_FD");
    if (want == NULL)
        return;
    int target = atoi(want);
    unsetenv("FTVM_UFFD_FD");
    unsetenv("LD_PRELOAD"); /* nothing QEMU might spawn inherits either */
    int fd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK | UFFD_USER_MODE_ONLY);
    if (fd < 0) {
        perror("ftvm-uffd: userfaultfd");
        return;
    }
    struct uffdio_api api = {.api = UFFD_API,
                             .features = FEATURE_WP_ASYNC | FEATURE_WP_UNPOPULATED | FEATURE_WP_HUGETLBFS_SHMEM};
    if (ioctl(fd, UFFDIO_API, &api) < 0) {
        perror("ftvm-uffd: UFFDIO_API");
        close(fd);
        return;
    }
    /* a known number, far above what QEMU opens, where the agent looks for it */
    if (target > 2 && fd != target) {
        if (dup3(fd, target, O_CLOEXEC) != target) {
            perror("ftvm-uffd: dup3");
            close(fd);
            return;
        }
        close(fd);
    }
}

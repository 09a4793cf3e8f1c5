/* ftvm-stable: an nbdkit filter for a level 2 partner's copy (qemu/copy_server.py).
 *
 * Every write, and every zeroing, is on stable storage when its reply leaves: it is passed
 * down with FUA (the file plugin then syncs its range), or followed by a flush where the
 * plugin below has no FUA. So the server can truthfully offer no FLUSH, and the primary's
 * QEMU then never sends one: its NBD client skips a flush the server does not offer. A
 * guest's synchronous write then costs one round trip to the partner instead of two (the
 * write, then its flush), which is what a metro link between sites pays for.
 *
 * Discards are not offered: the copy's space was reserved when it was made (a copy never
 * fails later on a full file system), and a zeroing keeps it reserved (no MAY_TRIM).
 *
 * Built by the agent with the host's C compiler against nbdkit-plugin-dev (setup.sh).
 */
#include <stdint.h>
#include <nbdkit-filter.h>

static int
stable_can_flush (nbdkit_next *next, void *handle)
{
  return 0;  /* nothing to flush: each write is stable when answered */
}

static int
stable_can_fua (nbdkit_next *next, void *handle)
{
  return NBDKIT_FUA_NONE;  /* every write is FUA already; the client need not ask */
}

static int
stable_can_trim (nbdkit_next *next, void *handle)
{
  return 0;
}

static int
synced (nbdkit_next *next, int r, int *err)
{
  if (r == -1)
    return -1;
  return next->flush (next, 0, err);
}

static int
stable_pwrite (nbdkit_next *next, void *handle, const void *buf, uint32_t count,
               uint64_t offset, uint32_t flags, int *err)
{
  if (next->can_fua (next) == NBDKIT_FUA_NONE)
    return synced (next, next->pwrite (next, buf, count, offset, flags & ~NBDKIT_FLAG_FUA, err), err);
  return next->pwrite (next, buf, count, offset, flags | NBDKIT_FLAG_FUA, err);
}

static int
stable_zero (nbdkit_next *next, void *handle, uint32_t count, uint64_t offset,
             uint32_t flags, int *err)
{
  flags &= ~NBDKIT_FLAG_MAY_TRIM;
  if (next->can_fua (next) == NBDKIT_FUA_NONE)
    return synced (next, next->zero (next, count, offset, flags & ~NBDKIT_FLAG_FUA, err), err);
  return next->zero (next, count, offset, flags | NBDKIT_FLAG_FUA, err);
}

static struct nbdkit_filter filter = {
  .name = "ftvm-stable",
  .longname = "ftvm: every write stable when answered, no flush offered",
  .can_flush = stable_can_flush,
  .can_fua = stable_can_fua,
  .can_trim = stable_can_trim,
  .pwrite = stable_pwrite,
  .zero = stable_zero,
};

NBDKIT_REGISTER_FILTER (filter)

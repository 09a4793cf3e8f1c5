/*
 * ftvm demo guest service: the "ledger".
 *
 * For every request line "W <payload>" received over TCP it appends one
 * 512-byte record to the block device with O_DSYNC, and only then replies
 * "OK <seq> <checksum>". A reply therefore means the record is durable on the
 * virtual disk. At boot it resumes after the last valid record.
 *
 * Record n (n >= 1) lives in sector n:
 *   0  magic "FTLG"        4  u32 version (1)
 *   8  u64 seq             16 u32 payload length
 *   20 u32 checksum (FNV-1a over the 512 bytes with this field zeroed)
 *   24 payload (at most 480 bytes, zero padded)
 * The Python reader is ftvm/guest/ledger_format.py: keep them in step.
 *
 * Other requests: "S" -> "SEQ <last>", "P" -> "PONG",
 * "F <kib> [<chunk_kib>]" -> writes <kib> KiB of non-zero data in O_DSYNC writes of
 *   <chunk_kib> KiB (default 64, at most 1024) to the scratch area (the second half of
 *   the disk, wrapping), replies "OK F <bytes> <usec>": a bulk write workload for
 *   benchmarks and resync tests.
 * "B <kib> [<chunk_kib>]" -> the same through the page cache (no O_DSYNC) and one
 *   fdatasync at the end (counted in <usec>), replies "OK B <bytes> <usec>": how a
 *   guest that flushes rarely writes.
 * "X panic" -> replies "OK X panic", then panics the guest kernel (sysrq 'c'): a guest
 *   failure for ftvm to notice (pvpanic) and restart.
 * "X hang" -> replies "OK X hang", then never answers anyone again: a guest that runs
 *   but no longer serves (for health probes).
 *
 * With an i6300esb watchdog device (`vm add --watchdog`) it arms it (WATCHDOG_S) and kicks
 * it from its loop: a service that hangs stops kicking, and QEMU resets the guest.
 *
 * With a third argument it also answers HTTP on that port: "GET /health" -> 200
 * "ledger ok seq=<last>", anything else 404 (a health probe, `vm add --health http:PORT/health`).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <dirent.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#define SECTOR 512
#define MAX_PAYLOAD 480
#define MAX_CLIENTS 64
#define LINE_MAX_LEN 1024

static int disk_fd;
static const char *disk_path;
static uint64_t last_seq;
static uint64_t capacity; /* records */
static uint64_t scratch_start, scratch_len, scratch_off; /* bytes */
static uint64_t fill_counter;

static uint32_t fnv1a(const unsigned char *p, size_t n) {
    uint32_t h = 2166136261u;
    for (size_t i = 0; i < n; i++) { h ^= p[i]; h *= 16777619u; }
    return h;
}

static int record_valid(const unsigned char *rec, uint64_t expect_seq) {
    uint32_t version, len, sum;
    uint64_t seq;
    unsigned char copy[SECTOR];
    if (memcmp(rec, "FTLG", 4) != 0) return 0;
    memcpy(&version, rec + 4, 4);
    memcpy(&seq, rec + 8, 8);
    memcpy(&len, rec + 16, 4);
    memcpy(&sum, rec + 20, 4);
    if (version != 1 || seq != expect_seq || len > MAX_PAYLOAD) return 0;
    memcpy(copy, rec, SECTOR);
    memset(copy + 20, 0, 4);
    return fnv1a(copy, SECTOR) == sum;
}

static void recover(void) {
    unsigned char buf[SECTOR * 64];
    uint64_t seq = 1;
    off_t size = lseek(disk_fd, 0, SEEK_END);
    scratch_start = ((uint64_t)size / 2) & ~(uint64_t)65535;
    scratch_len = (uint64_t)size - scratch_start;
    capacity = scratch_start / SECTOR - 1;
    for (;;) {
        ssize_t n = pread(disk_fd, buf, sizeof buf, (off_t)seq * SECTOR);
        if (n < SECTOR) break;
        int i, done = 0;
        for (i = 0; i < n / SECTOR; i++) {
            if (!record_valid(buf + i * SECTOR, seq)) { done = 1; break; }
            seq++;
        }
        if (done) break;
    }
    last_seq = seq - 1;
}

/* Returns the checksum, or 0 with errno set on failure. */
static int append(const char *payload, size_t len, uint32_t *sum_out) {
    unsigned char rec[SECTOR];
    uint32_t version = 1, plen, sum;
    uint64_t seq = last_seq + 1;
    if (seq > capacity) { errno = ENOSPC; return -1; }
    if (len > MAX_PAYLOAD) len = MAX_PAYLOAD;
    plen = (uint32_t)len;
    memset(rec, 0, SECTOR);
    memcpy(rec, "FTLG", 4);
    memcpy(rec + 4, &version, 4);
    memcpy(rec + 8, &seq, 8);
    memcpy(rec + 16, &plen, 4);
    memcpy(rec + 24, payload, len);
    sum = fnv1a(rec, SECTOR);
    memcpy(rec + 20, &sum, 4);
    if (pwrite(disk_fd, rec, SECTOR, (off_t)seq * SECTOR) != SECTOR) return -1;
    last_seq = seq;
    *sum_out = sum;
    return 0;
}

/* Bulk write of `kib` KiB into the scratch area through `fd`; returns microseconds taken
   (a final fdatasync included when `sync_at_end`), -1 on error. */
static long long fill(int fd, unsigned long kib, unsigned long chunk_kib, int sync_at_end) {
    static unsigned char chunk[1024 * 1024];
    size_t chunk_len = (chunk_kib >= 1 && chunk_kib <= 1024 ? chunk_kib : 64) * 1024;
    struct timeval t0, t1;
    uint64_t left = (uint64_t)kib * 1024;
    gettimeofday(&t0, NULL);
    while (left > 0) {
        size_t n = left < chunk_len ? (size_t)left : chunk_len;
        fill_counter++;
        for (size_t i = 0; i < n; i += 8) {
            uint64_t v = (fill_counter << 32) ^ (i * 0x9E3779B97F4A7C15ull) ^ 0x5555555555555555ull;
            memcpy(chunk + i, &v, 8);
        }
        if (scratch_off + n > scratch_len) scratch_off = 0; /* wraps (child: within its stretch) */
        if (pwrite(fd, chunk, n, (off_t)(scratch_start + scratch_off)) != (ssize_t)n) return -1;
        scratch_off += n;
        left -= n;
    }
    if (sync_at_end && fdatasync(fd) != 0) return -1;
    gettimeofday(&t1, NULL);
    return (long long)(t1.tv_sec - t0.tv_sec) * 1000000 + (t1.tv_usec - t0.tv_usec);
}

/* http: 0 a ledger client; 1 an HTTP client before its request line, 2 after "GET /health",
   3 after any other request line */
struct client { int fd; int http; size_t used; char buf[LINE_MAX_LEN]; };

static void reply(int fd, const char *msg) {
    size_t len = strlen(msg), off = 0;
    while (off < len) {
        ssize_t n = write(fd, msg + off, len - off);
        if (n < 0) { if (errno == EINTR) continue; return; }
        off += (size_t)n;
    }
}

static void handle_line(int fd, char *line, size_t len) {
    char out[128];
    uint32_t sum;
    if (len >= 1 && line[0] == 'W') {
        const char *p = len >= 2 ? line + 2 : line + len;
        size_t plen = len >= 2 ? len - 2 : 0;
        if (append(p, plen, &sum) != 0) {
            snprintf(out, sizeof out, "ERR %s\n", strerror(errno));
        } else {
            snprintf(out, sizeof out, "OK %llu %08x\n", (unsigned long long)last_seq, sum);
        }
    } else if (len >= 1 && line[0] == 'S') {
        snprintf(out, sizeof out, "SEQ %llu\n", (unsigned long long)last_seq);
    } else if (len >= 3 && (line[0] == 'F' || line[0] == 'B')) {
        int buffered = line[0] == 'B';
        char *end;
        unsigned long kib = strtoul(line + 2, &end, 10);
        unsigned long chunk_kib = strtoul(end, NULL, 10);
        /* Each bulk write runs in a child process on its own stretch of the scratch area,
           so several clients' bulk writes proceed concurrently (queue depth > 1). */
        uint64_t bytes = (uint64_t)kib * 1024;
        if (scratch_off + bytes > scratch_len) scratch_off = 0;
        uint64_t my_off = scratch_off;
        scratch_off += bytes;
        fill_counter += 1000003;
        if (fork() == 0) {
            scratch_off = my_off;
            int wfd = buffered ? open(disk_path, O_RDWR) : disk_fd;
            long long usec = wfd < 0 ? -1 : fill(wfd, kib, chunk_kib, buffered);
            if (usec < 0) snprintf(out, sizeof out, "ERR %s\n", strerror(errno));
            else snprintf(out, sizeof out, "OK %c %llu %lld\n", line[0], (unsigned long long)bytes, usec);
            reply(fd, out);
            _exit(0);
        }
        return;
    } else if (len >= 1 && line[0] == 'P') {
        snprintf(out, sizeof out, "PONG\n");
    } else if (len == 7 && memcmp(line, "X panic", 7) == 0) {
        /* a guest failure on demand: the kernel panics (pvpanic tells the host) */
        reply(fd, "OK X panic\n");
        sync();
        int t = open("/proc/sysrq-trigger", O_WRONLY);
        if (t >= 0) { (void)write(t, "c", 1); close(t); }
        return;
    } else if (len == 6 && memcmp(line, "X hang", 6) == 0) {
        /* a guest that runs but no longer serves: this service stops answering anyone */
        reply(fd, "OK X hang\n");
        for (;;) pause();
    } else {
        snprintf(out, sizeof out, "ERR unknown request\n");
    }
    reply(fd, out);
}

/* The i6300esb watchdog, driven from user space through sysfs (the demo kernel has no
   driver for it): config space for the mode and enable bits, BAR 0 for the timers and the
   reload register, each write behind the two-step unlock. Two stages of WATCHDOG_S / 2 at
   the 1 kHz scale (preload << 15 ticks of 30 ns), then QEMU's watchdog action. */
#define WATCHDOG_S 5
static volatile uint8_t *esb; /* BAR 0, NULL without the device */

static int read_hex(const char *dir, const char *name) {
    char path[512], buf[32];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    int fd = open(path, O_RDONLY);
    if (fd < 0) return -1;
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n <= 0) return -1;
    buf[n] = 0;
    return (int)strtol(buf, NULL, 16);
}

static void esb_write16(unsigned off, uint16_t v) { *(volatile uint16_t *)(esb + off) = v; }
static void esb_write32(unsigned off, uint32_t v) { *(volatile uint32_t *)(esb + off) = v; }
static void esb_unlock(void) { esb_write16(0x0c, 0x80); esb_write16(0x0c, 0x86); }

static void watchdog_kick(void) {
    if (!esb) return;
    esb_unlock();
    esb_write16(0x0c, 0x100); /* reload */
}

static void watchdog_arm(void) {
    char dev[300];
    DIR *d = opendir("/sys/bus/pci/devices");
    struct dirent *e;
    int found = 0;
    while (d && (e = readdir(d)) != NULL) {
        if (e->d_name[0] == '.') continue;
        snprintf(dev, sizeof dev, "/sys/bus/pci/devices/%s", e->d_name);
        if (read_hex(dev, "vendor") == 0x8086 && read_hex(dev, "device") == 0x25ab) { found = 1; break; }
    }
    if (d) closedir(d);
    if (!found) return;
    char path[400];
    snprintf(path, sizeof path, "%s/enable", dev);
    int fd = open(path, O_WRONLY);
    if (fd >= 0) { (void)write(fd, "1", 1); close(fd); }
    snprintf(path, sizeof path, "%s/config", dev);
    int cfg = open(path, O_RDWR);
    snprintf(path, sizeof path, "%s/resource0", dev);
    int bar = open(path, O_RDWR | O_SYNC);
    void *m = bar < 0 ? MAP_FAILED : mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED, bar, 0);
    if (cfg < 0 || m == MAP_FAILED) { perror("ftvm-ledger: i6300esb"); if (cfg >= 0) close(cfg); return; }
    esb = m;
    uint16_t conf = 0x0003; /* no interrupt after stage 1, 1 kHz scale, reset enabled (bit 5 clear) */
    uint8_t lock = 0;       /* disabled while the timers are set */
    (void)pwrite(cfg, &conf, 2, 0x60);
    (void)pwrite(cfg, &lock, 1, 0x68);
    uint32_t preload = (uint32_t)WATCHDOG_S << 9;
    esb_unlock(); esb_write32(0x00, preload);
    esb_unlock(); esb_write32(0x04, preload);
    esb_unlock(); esb_write16(0x0c, 0x200 | 0x100); /* clear the timed-out flag, reload */
    lock = 0x02; /* enabled, not locked */
    (void)pwrite(cfg, &lock, 1, 0x68);
    close(cfg);
    printf("ftvm-ledger: i6300esb watchdog armed (%d s)\n", WATCHDOG_S);
    fflush(stdout);
}

/* The HTTP health endpoint: answered by the same loop as the ledger, so a ledger that hangs
   ("X hang") stops answering it too. */
static void http_reply(int fd, int health) {
    char body[64], out[256];
    if (health) snprintf(body, sizeof body, "ledger ok seq=%llu\n", (unsigned long long)last_seq);
    else snprintf(body, sizeof body, "not found\n");
    snprintf(out, sizeof out, "HTTP/1.0 %s\r\nContent-Type: text/plain\r\nContent-Length: %zu\r\n"
             "Connection: close\r\n\r\n%s", health ? "200 OK" : "404 Not Found", strlen(body), body);
    reply(fd, out);
}

static int listen_on(int port) {
    int fd = socket(AF_INET, SOCK_STREAM, 0), one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in addr = { .sin_family = AF_INET, .sin_port = htons(port) };
    if (bind(fd, (struct sockaddr *)&addr, sizeof addr) != 0 || listen(fd, 64) != 0) {
        perror("listen"); exit(1);
    }
    return fd;
}

int main(int argc, char **argv) {
    if (argc != 3 && argc != 4) { fprintf(stderr, "usage: ledger DEVICE PORT [HTTP_PORT]\n"); return 2; }
    signal(SIGCHLD, SIG_IGN); /* bulk-write children reap themselves */
    disk_path = argv[1];
    disk_fd = open(argv[1], O_RDWR | O_DSYNC);
    if (disk_fd < 0) { perror("open disk"); return 1; }
    recover();
    int one = 1;
    int lfd = listen_on(atoi(argv[2]));
    int hfd = argc == 4 ? listen_on(atoi(argv[3])) : -1; /* poll skips a negative fd */
    watchdog_arm();
    printf("ftvm-ledger ready seq=%llu capacity=%llu\n",
           (unsigned long long)last_seq, (unsigned long long)capacity);
    fflush(stdout);

    static struct client clients[MAX_CLIENTS];
    struct pollfd pfds[MAX_CLIENTS + 2];
    int nclients = 0;
    for (;;) {
        pfds[0].fd = lfd; pfds[0].events = POLLIN;
        pfds[1].fd = hfd; pfds[1].events = POLLIN;
        for (int i = 0; i < nclients; i++) { pfds[i + 2].fd = clients[i].fd; pfds[i + 2].events = POLLIN; }
        watchdog_kick(); /* at least every second while the loop runs */
        if (poll(pfds, nclients + 2, esb ? 1000 : -1) < 0) { if (errno == EINTR) continue; return 1; }
        for (int i = nclients - 1; i >= 0; i--) {
            if (!(pfds[i + 2].revents & (POLLIN | POLLHUP | POLLERR))) continue;
            struct client *c = &clients[i];
            ssize_t n = read(c->fd, c->buf + c->used, sizeof c->buf - c->used);
            if (n <= 0) {
                close(c->fd);
                clients[i] = clients[--nclients];
                continue;
            }
            c->used += (size_t)n;
            char *start = c->buf, *nl;
            int answered = 0;
            while ((nl = memchr(start, '\n', c->used - (size_t)(start - c->buf))) != NULL) {
                char *line = start;
                *nl = 0;
                size_t len = (size_t)(nl - line);
                if (len && line[len - 1] == '\r') line[--len] = 0;
                start = nl + 1;
                if (c->http == 1) {        /* the request line */
                    c->http = len >= 11 && memcmp(line, "GET /health", 11) == 0
                              && (len == 11 || line[11] == ' ' || line[11] == '?') ? 2 : 3;
                } else if (c->http) {      /* headers, up to the empty line */
                    if (len == 0) { http_reply(c->fd, c->http == 2); answered = 1; break; }
                } else {
                    handle_line(c->fd, line, len);
                }
            }
            if (answered) {
                close(c->fd);
                clients[i] = clients[--nclients];
                continue;
            }
            c->used -= (size_t)(start - c->buf);
            memmove(c->buf, start, c->used);
            if (c->used == sizeof c->buf) c->used = 0; /* overlong line: drop */
        }
        for (int k = 0; k < 2; k++) {
            if (!(pfds[k].revents & POLLIN)) continue;
            int cfd = accept(pfds[k].fd, NULL, NULL);
            if (cfd >= 0) {
                if (nclients == MAX_CLIENTS) { close(cfd); }
                else {
                    setsockopt(cfd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
                    clients[nclients].fd = cfd; clients[nclients].used = 0;
                    clients[nclients].http = k == 1; nclients++;
                }
            }
        }
    }
}

/*
 * ftvm lab: a metro link between two sites, emulated in user space (the lab's kernel has
 * no netem). Forwards every frame between two interfaces of one network namespace, each
 * way after a one-way delay and at a rate (a link of that bandwidth: a frame leaves when
 * the previous one has been serialised), dropping what does not fit in QUEUE_BYTES of
 * buffer, as a router would.
 *
 *   linkdelay IF_A IF_B PARAMS_FILE
 *
 * PARAMS_FILE holds "<one-way delay in microseconds> <rate in bits/s, 0: unlimited>"; it is
 * read at start and again on SIGHUP (`ftvm lab link` changes a running link).
 *
 * Frames are read and written with a virtio-net header (PACKET_VNET_HDR), as QEMU does with
 * taps: a veth hands over segmentation-offloaded frames of up to 64 KiB, and the kernel
 * segments them again on the way out.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <linux/if_packet.h>
#include <net/ethernet.h>
#include <net/if.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAX_FRAME (65536 + 64)
#define QUEUE_BYTES (8u << 20)   /* per direction */
#define QUEUE_SLOTS 16384

#ifndef PACKET_VNET_HDR
#define PACKET_VNET_HDR 15
#endif
#ifndef PACKET_IGNORE_OUTGOING
#define PACKET_IGNORE_OUTGOING 23
#endif

struct frame { uint64_t due_ns; uint32_t len; unsigned char *data; };
struct queue { struct frame slot[QUEUE_SLOTS]; unsigned head, count; uint64_t bytes, free_at_ns; uint64_t dropped; };

static volatile sig_atomic_t reload = 1;
static uint64_t delay_ns, rate_bps;
static const char *params_path;

static void on_hup(int sig) { (void)sig; reload = 1; }

static uint64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000000ull + (uint64_t)t.tv_nsec;
}

static void read_params(void) {
    FILE *f = fopen(params_path, "r");
    unsigned long long d = 0, r = 0;
    if (!f || fscanf(f, "%llu %llu", &d, &r) != 2) {
        fprintf(stderr, "linkdelay: cannot read %s: keeping the settings\n", params_path);
    } else {
        delay_ns = d * 1000ull;
        rate_bps = r;
        fprintf(stderr, "linkdelay: one-way delay %llu us, rate %llu bit/s\n", d, r);
    }
    if (f) fclose(f);
}

static int open_if(const char *name) {
    int fd = socket(AF_PACKET, SOCK_RAW | SOCK_NONBLOCK, htons(ETH_P_ALL));
    if (fd < 0) { perror("linkdelay: socket"); exit(1); }
    int one = 1;
    if (setsockopt(fd, SOL_PACKET, PACKET_VNET_HDR, &one, sizeof one) != 0) { perror("vnet_hdr"); exit(1); }
    (void)setsockopt(fd, SOL_PACKET, PACKET_IGNORE_OUTGOING, &one, sizeof one); /* not our own sends */
    int big = 4 << 20;
    (void)setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &big, sizeof big);
    (void)setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &big, sizeof big);
    struct sockaddr_ll sll = { .sll_family = AF_PACKET, .sll_protocol = htons(ETH_P_ALL),
                               .sll_ifindex = (int)if_nametoindex(name) };
    if (sll.sll_ifindex == 0 || bind(fd, (struct sockaddr *)&sll, sizeof sll) != 0) {
        fprintf(stderr, "linkdelay: interface %s: %s\n", name, strerror(errno));
        exit(1);
    }
    struct packet_mreq mr = { .mr_ifindex = sll.sll_ifindex, .mr_type = PACKET_MR_PROMISC };
    if (setsockopt(fd, SOL_PACKET, PACKET_ADD_MEMBERSHIP, &mr, sizeof mr) != 0) { perror("promisc"); exit(1); }
    return fd;
}

/* Queue a frame read from one side; it leaves after the delay, once the link is free. */
static void enqueue(struct queue *q, const unsigned char *buf, uint32_t len, uint64_t now) {
    if (q->count == QUEUE_SLOTS || q->bytes + len > QUEUE_BYTES) { q->dropped++; return; }
    uint64_t due = now + delay_ns;
    if (rate_bps) {
        uint64_t start = q->free_at_ns > now ? q->free_at_ns : now;
        q->free_at_ns = start + (uint64_t)len * 8ull * 1000000000ull / rate_bps;
        due = q->free_at_ns + delay_ns;
    }
    struct frame *f = &q->slot[(q->head + q->count) % QUEUE_SLOTS];
    f->data = malloc(len);
    if (!f->data) { q->dropped++; return; }
    memcpy(f->data, buf, len);
    f->len = len;
    f->due_ns = due;
    q->count++;
    q->bytes += len;
}

/* Send what is due; returns ns until the next frame is (or -1: none queued). */
static int64_t flush(struct queue *q, int out, uint64_t now) {
    while (q->count) {
        struct frame *f = &q->slot[q->head];
        if (f->due_ns > now) return (int64_t)(f->due_ns - now);
        if (send(out, f->data, f->len, 0) < 0 && errno == EAGAIN) return 100000; /* full: again soon */
        free(f->data);
        q->bytes -= f->len;
        q->head = (q->head + 1) % QUEUE_SLOTS;
        q->count--;
    }
    return -1;
}

int main(int argc, char **argv) {
    if (argc != 4) { fprintf(stderr, "usage: linkdelay IF_A IF_B PARAMS_FILE\n"); return 2; }
    params_path = argv[3];
    signal(SIGHUP, on_hup);
    int fd[2] = { open_if(argv[1]), open_if(argv[2]) };
    static struct queue q[2]; /* q[i]: frames read on side i, to send on the other */
    static unsigned char buf[MAX_FRAME];
    for (;;) {
        if (reload) { reload = 0; read_params(); }
        uint64_t now = now_ns();
        int64_t wait = -1;
        for (int i = 0; i < 2; i++) {
            int64_t w = flush(&q[i], fd[1 - i], now);
            if (w >= 0 && (wait < 0 || w < wait)) wait = w;
        }
        struct pollfd p[2] = { { fd[0], POLLIN, 0 }, { fd[1], POLLIN, 0 } };
        struct timespec ts = { wait < 0 ? 1 : wait / 1000000000, wait < 0 ? 0 : wait % 1000000000 };
        if (ppoll(p, 2, &ts, NULL) < 0 && errno != EINTR) { perror("linkdelay: poll"); return 1; }
        now = now_ns();
        for (int i = 0; i < 2; i++) {
            if (!(p[i].revents & POLLIN)) continue;
            for (int n = 0; n < 256; n++) {
                ssize_t len = recv(fd[i], buf, sizeof buf, 0);
                if (len <= 0) break;
                enqueue(&q[i], buf, (uint32_t)len, now);
            }
        }
    }
}

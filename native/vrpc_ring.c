/* The VRPC ring: server side (init, drain, complete, arm/disarm, close) and client side (open,
 * submit, reap, wait), following the ordering rules R1-R7 of native/README.md.
 *
 * Invariants this file protects:
 * - The server never reads back a word it owns (sq_head, cq_tail, server_flags, geometry): it
 *   writes them from struct vrpc_srv (R5). Every client word it reads (sq_tail, SQEs,
 *   client_flags) is loaded once into a local and validated before use (R2, R3), so a hostile
 *   client can only get its own channel closed, never an out-of-bounds access.
 * - Producer: plain stores of the entry, then a store-release of the tail; consumer: load-acquire
 *   of the tail, copy the entry, store-release of the head (R1).
 * - Sleeper: store flag, seq_cst fence, reload the other side's tail. Waker: store-release tail,
 *   seq_cst fence, load flag, kick if set (R4: no lost wakeups).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <sched.h>
#include <stddef.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "vrpc.h"

#define SQ_OFFSET VRPC_HEADER_SIZE
#define SLOT_OFFSET (2 * VRPC_HEADER_SIZE)
#define ENTRY_SIZE 16u
#define CQE_KNOWN_FLAGS (VRPC_CQE_NOREPLY | VRPC_CQE_FAST)

static inline uint32_t load_acquire(const uint32_t *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
static inline uint32_t load_relaxed(const uint32_t *p) { return __atomic_load_n(p, __ATOMIC_RELAXED); }
static inline void store_release(uint32_t *p, uint32_t v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }
static inline void store_relaxed(uint32_t *p, uint32_t v) { __atomic_store_n(p, v, __ATOMIC_RELAXED); }
static inline void full_fence(void) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }

static inline int is_pow2(uint32_t x) { return x != 0 && (x & (x - 1)) == 0; }

static void ring_bell(int fd)
{
    uint64_t one = 1;
    if (fd >= 0) {
        /* EAGAIN means the counter is already non-zero: the peer will wake anyway. */
        ssize_t r;
        do {
            r = write(fd, &one, sizeof one);
        } while (r < 0 && errno == EINTR);
    }
}

static void drain_bell(int fd)
{
    uint64_t value;
    ssize_t r;
    do {
        r = read(fd, &value, sizeof value);
    } while (r < 0 && errno == EINTR);
}

uint64_t vrpc_ring_size(uint32_t nslots)
{
    if (nslots < 1 || nslots > VRPC_MAX_SLOTS)
        return 0;
    return (uint64_t)SLOT_OFFSET + (uint64_t)nslots * VRPC_SLOT_SIZE;
}

/* ------------------------------------------------------------------------------------------- */
/* Server                                                                                       */

int vrpc_srv_init(struct vrpc_srv *srv, void *base, uint64_t segment_size, uint32_t nslots,
                  uint32_t entries, uint32_t doorbell, uint32_t features, uint64_t boot_id,
                  uint64_t channel_id, int call_fd, uint32_t first_index)
{
    uint64_t need = vrpc_ring_size(nslots);
    if (base == NULL || need == 0 || segment_size < need || segment_size % 4096 != 0 ||
        !is_pow2(entries) || entries < nslots || entries > VRPC_MAX_ENTRIES ||
        (doorbell != VRPC_DOORBELL_EVENTFD && doorbell != VRPC_DOORBELL_POLL))
        return -EINVAL;
    struct vrpc_ring_header *hdr = base;
    memset(base, 0, SLOT_OFFSET);
    hdr->abi_major = VRPC_ABI_MAJOR;
    hdr->abi_minor = VRPC_ABI_MINOR;
    hdr->header_size = VRPC_HEADER_SIZE;
    hdr->segment_size = segment_size;
    hdr->boot_id = boot_id;
    hdr->channel_id = channel_id;
    hdr->sq_offset = SQ_OFFSET;
    hdr->cq_offset = SQ_OFFSET + ENTRY_SIZE * entries;
    hdr->entries = entries;
    hdr->nslots = nslots;
    hdr->slot_offset = SLOT_OFFSET;
    hdr->slot_size = VRPC_SLOT_SIZE;
    hdr->doorbell = doorbell;
    hdr->features = features;
    hdr->sq_tail = hdr->sq_head = hdr->cq_tail = hdr->cq_head = first_index;
    __atomic_store_n(&hdr->magic, (uint64_t)VRPC_RING_MAGIC, __ATOMIC_RELEASE);

    memset(srv, 0, sizeof *srv);
    srv->hdr = hdr;
    srv->sq = (uint8_t *)base + SQ_OFFSET;
    srv->cq = srv->sq + ENTRY_SIZE * entries;
    srv->slots = (uint8_t *)base + SLOT_OFFSET;
    srv->segment_size = segment_size;
    srv->entries = entries;
    srv->nslots = nslots;
    srv->slot_size = VRPC_SLOT_SIZE;
    srv->sq_head = srv->cq_tail = first_index;
    srv->call_fd = doorbell == VRPC_DOORBELL_EVENTFD ? call_fd : -1;
    return 0;
}

static void close_with(struct vrpc_srv *srv, uint32_t flags)
{
    srv->server_flags |= flags;
    store_release(&srv->hdr->server_flags, srv->server_flags);
    full_fence();
    ring_bell(srv->call_fd);
}

void vrpc_srv_close(struct vrpc_srv *srv) { close_with(srv, VRPC_SERVER_CLOSED); }

void vrpc_srv_retire(struct vrpc_srv *srv)
{
    close_with(srv, VRPC_SERVER_CLOSED | VRPC_SERVER_GONE);
}

static int protocol_error(struct vrpc_srv *srv, uint32_t error, uint32_t index, uint32_t value)
{
    srv->error = error;
    srv->error_index = index;
    srv->error_value = value;
    vrpc_srv_close(srv);
    return -EPROTO;
}

int vrpc_srv_drain(struct vrpc_srv *srv, struct vrpc_work *work, uint32_t max)
{
    if (srv->error)
        return -EPROTO;
    if (srv->server_flags & VRPC_SERVER_CLOSED)
        return -EPIPE;
    uint32_t head = srv->sq_head;
    uint32_t tail = load_acquire(&srv->hdr->sq_tail);
    if (tail - head > srv->entries)
        return protocol_error(srv, VRPC_ERR_SQ_OVERRUN, head, tail);
    uint32_t n = 0;
    while (head != tail && n < max) {
        const struct vrpc_sqe *sqe =
            (const struct vrpc_sqe *)(srv->sq + ENTRY_SIZE * (head & (srv->entries - 1)));
        uint32_t slot = load_relaxed(&sqe->slot);
        uint32_t len = load_relaxed(&sqe->len);
        uint32_t flags = load_relaxed(&sqe->flags);
        if (flags != 0)
            return protocol_error(srv, VRPC_ERR_SQE_FLAGS, head, flags);
        if (slot >= srv->nslots)
            return protocol_error(srv, VRPC_ERR_SQE_SLOT, head, slot);
        if (len > srv->slot_size)
            return protocol_error(srv, VRPC_ERR_SQE_LEN, head, len);
        uint64_t bit = (uint64_t)1 << slot;
        if (srv->inflight & bit)
            return protocol_error(srv, VRPC_ERR_SLOT_BUSY, head, slot);
        srv->inflight |= bit;
        work[n].slot = slot;
        work[n].len = len;
        n++;
        head++;
    }
    srv->calls += n;
    srv->sq_head = head;
    store_release(&srv->hdr->sq_head, head);
    return (int)n;
}

int vrpc_srv_complete(struct vrpc_srv *srv, uint32_t slot, const void *reply, uint32_t len,
                      uint32_t flags)
{
    if (slot >= srv->nslots || !(srv->inflight & ((uint64_t)1 << slot)) || len > srv->slot_size ||
        (flags & ~CQE_KNOWN_FLAGS) != 0)
        return -EINVAL;
    srv->inflight &= ~((uint64_t)1 << slot);
    if (srv->server_flags & VRPC_SERVER_CLOSED)
        return -EPIPE;
    if (reply != NULL && len != 0)
        memcpy(srv->slots + (uint64_t)slot * srv->slot_size, reply, len);
    struct vrpc_cqe *cqe =
        (struct vrpc_cqe *)(srv->cq + ENTRY_SIZE * (srv->cq_tail & (srv->entries - 1)));
    store_relaxed(&cqe->slot, slot);
    store_relaxed(&cqe->len, len);
    store_relaxed(&cqe->flags, flags);
    store_relaxed(&cqe->reserved, 0);
    srv->cq_tail++;
    store_release(&srv->hdr->cq_tail, srv->cq_tail);
    full_fence();
    if (load_relaxed(&srv->hdr->client_flags) & VRPC_CLIENT_WAITING) {
        ring_bell(srv->call_fd);
        return 1;
    }
    return 0;
}

int vrpc_srv_arm(struct vrpc_srv *srv)
{
    if (srv->server_flags & VRPC_SERVER_CLOSED)
        return 0;
    srv->server_flags |= VRPC_SERVER_IDLE;
    store_relaxed(&srv->hdr->server_flags, srv->server_flags);
    full_fence();
    return load_acquire(&srv->hdr->sq_tail) != srv->sq_head;
}

void vrpc_srv_disarm(struct vrpc_srv *srv)
{
    srv->server_flags &= ~(uint32_t)VRPC_SERVER_IDLE;
    store_relaxed(&srv->hdr->server_flags, srv->server_flags);
}

/* ------------------------------------------------------------------------------------------- */
/* Client                                                                                       */

int vrpc_cli_open(struct vrpc_cli *cli, void *base, uint64_t mapped_size, int kick_fd,
                  int call_fd)
{
    if (base == NULL || mapped_size < SLOT_OFFSET)
        return -EINVAL;
    struct vrpc_ring_header *hdr = base;
    if (__atomic_load_n(&hdr->magic, __ATOMIC_ACQUIRE) != (uint64_t)VRPC_RING_MAGIC)
        return -EBADMSG;
    if (hdr->abi_major != VRPC_ABI_MAJOR)
        return -EPROTONOSUPPORT;
    /* Copy the geometry once; validate and use only the copies. */
    uint32_t header_size = hdr->header_size, sq_offset = hdr->sq_offset;
    uint32_t cq_offset = hdr->cq_offset, entries = hdr->entries, nslots = hdr->nslots;
    uint32_t slot_offset = hdr->slot_offset, slot_size = hdr->slot_size;
    uint32_t doorbell = hdr->doorbell;
    uint64_t segment_size = hdr->segment_size;
    uint64_t need = vrpc_ring_size(nslots);
    if (header_size != VRPC_HEADER_SIZE || segment_size != mapped_size || need == 0 ||
        segment_size < need || sq_offset != SQ_OFFSET || !is_pow2(entries) || entries < nslots ||
        entries > VRPC_MAX_ENTRIES || cq_offset != SQ_OFFSET + ENTRY_SIZE * entries ||
        slot_offset != SLOT_OFFSET || slot_size != VRPC_SLOT_SIZE ||
        (doorbell != VRPC_DOORBELL_EVENTFD && doorbell != VRPC_DOORBELL_POLL) ||
        (doorbell == VRPC_DOORBELL_EVENTFD && (kick_fd < 0 || call_fd < 0)))
        return -EINVAL;
    memset(cli, 0, sizeof *cli);
    cli->hdr = hdr;
    cli->sq = (uint8_t *)base + SQ_OFFSET;
    cli->cq = cli->sq + ENTRY_SIZE * entries;
    cli->slots = (uint8_t *)base + SLOT_OFFSET;
    cli->segment_size = segment_size;
    cli->boot_id = hdr->boot_id;
    cli->channel_id = hdr->channel_id;
    cli->entries = entries;
    cli->nslots = nslots;
    cli->slot_size = slot_size;
    cli->doorbell = doorbell;
    cli->features = hdr->features;
    cli->sq_tail = load_relaxed(&hdr->sq_tail);
    cli->cq_head = load_relaxed(&hdr->cq_head);
    cli->kick_fd = doorbell == VRPC_DOORBELL_EVENTFD ? kick_fd : -1;
    cli->call_fd = doorbell == VRPC_DOORBELL_EVENTFD ? call_fd : -1;
    return 0;
}

static inline int server_closed(const struct vrpc_cli *cli)
{
    return (load_acquire(&cli->hdr->server_flags) & VRPC_SERVER_CLOSED) != 0;
}

int vrpc_cli_submit(struct vrpc_cli *cli, uint32_t slot, uint32_t len)
{
    if (server_closed(cli))
        return -EPIPE;
    if (slot >= cli->nslots || len > cli->slot_size)
        return -EINVAL;
    uint64_t bit = (uint64_t)1 << slot;
    if (cli->inflight & bit)
        return -EBUSY;
    cli->inflight |= bit;
    struct vrpc_sqe *sqe =
        (struct vrpc_sqe *)(cli->sq + ENTRY_SIZE * (cli->sq_tail & (cli->entries - 1)));
    store_relaxed(&sqe->slot, slot);
    store_relaxed(&sqe->len, len);
    store_relaxed(&sqe->flags, 0);
    store_relaxed(&sqe->reserved, 0);
    cli->sq_tail++;
    store_release(&cli->hdr->sq_tail, cli->sq_tail);
    full_fence();
    if (load_relaxed(&cli->hdr->server_flags) & VRPC_SERVER_IDLE) {
        ring_bell(cli->kick_fd);
        return 1;
    }
    return 0;
}

int vrpc_cli_reap(struct vrpc_cli *cli, struct vrpc_cqe *out, uint32_t max)
{
    uint32_t head = cli->cq_head;
    uint32_t tail = load_acquire(&cli->hdr->cq_tail);
    if (tail - head > cli->entries)
        return -EPROTO;
    uint32_t n = 0;
    while (head != tail && n < max) {
        const struct vrpc_cqe *cqe =
            (const struct vrpc_cqe *)(cli->cq + ENTRY_SIZE * (head & (cli->entries - 1)));
        uint32_t slot = load_relaxed(&cqe->slot);
        uint32_t len = load_relaxed(&cqe->len);
        uint32_t flags = load_relaxed(&cqe->flags);
        if (slot >= cli->nslots || !(cli->inflight & ((uint64_t)1 << slot)) ||
            len > cli->slot_size || (flags & ~CQE_KNOWN_FLAGS) != 0 ||
            ((flags & VRPC_CQE_NOREPLY) && len != 0))
            return -EPROTO;
        cli->inflight &= ~((uint64_t)1 << slot);
        out[n].slot = slot;
        out[n].len = len;
        out[n].flags = flags;
        out[n].reserved = 0;
        n++;
        head++;
    }
    cli->cq_head = head;
    store_release(&cli->hdr->cq_head, head);
    if (n == 0 && server_closed(cli))
        return -EPIPE;
    return (int)n;
}

static int64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static inline int cq_ready(const struct vrpc_cli *cli)
{
    return load_acquire(&cli->hdr->cq_tail) != cli->cq_head;
}

/* Poll-mode doorbell (ivshmem guests): no fds, back off from yielding to 1 ms sleeps. */
static int wait_polling(struct vrpc_cli *cli, int timeout_ms)
{
    int64_t deadline = timeout_ms < 0 ? -1 : now_ms() + timeout_ms;
    long pause_ns = 0;
    for (;;) {
        if (cq_ready(cli))
            return 1;
        if (server_closed(cli))
            return -EPIPE;
        if (deadline >= 0 && now_ms() >= deadline)
            return 0;
        if (pause_ns == 0) {
            sched_yield();
            pause_ns = 20000;
        } else {
            struct timespec ts = {0, pause_ns};
            nanosleep(&ts, NULL);
            pause_ns = pause_ns * 2 > 1000000 ? 1000000 : pause_ns * 2;
        }
    }
}

int vrpc_cli_wait(struct vrpc_cli *cli, int timeout_ms, int extra_fd)
{
    if (cq_ready(cli))
        return 1;
    if (server_closed(cli))
        return -EPIPE;
    if (cli->call_fd < 0)
        return wait_polling(cli, timeout_ms);
    int64_t deadline = timeout_ms < 0 ? -1 : now_ms() + timeout_ms;
    for (;;) {
        store_relaxed(&cli->hdr->client_flags, VRPC_CLIENT_WAITING);
        full_fence();
        if (cq_ready(cli) || server_closed(cli)) {
            store_relaxed(&cli->hdr->client_flags, 0);
            return cq_ready(cli) ? 1 : -EPIPE;
        }
        int left = -1;
        if (deadline >= 0) {
            int64_t rest = deadline - now_ms();
            left = rest < 0 ? 0 : (int)rest;
        }
        struct pollfd fds[2] = {{cli->call_fd, POLLIN, 0}, {extra_fd, POLLIN, 0}};
        int r = poll(fds, extra_fd >= 0 ? 2 : 1, left);
        int err = errno;
        store_relaxed(&cli->hdr->client_flags, 0);
        if (r < 0)
            return -err;
        if (fds[0].revents & POLLIN)
            drain_bell(cli->call_fd);
        if (cq_ready(cli))
            return 1;
        if (server_closed(cli) || (extra_fd >= 0 && fds[1].revents != 0) ||
            (fds[0].revents & (POLLERR | POLLHUP | POLLNVAL)))
            return -EPIPE;
        if (r == 0 || (deadline >= 0 && now_ms() >= deadline))
            return 0;
    }
}

int vrpc_cli_call(struct vrpc_cli *cli, uint32_t slot, uint32_t len, int timeout_ms,
                  int extra_fd, struct vrpc_cqe *out)
{
    if (cli->inflight != 0)
        return -EBUSY;
    int r = vrpc_cli_submit(cli, slot, len);
    if (r < 0)
        return r;
    for (;;) {
        r = vrpc_cli_reap(cli, out, 1); /* the only slot in flight: its completion */
        if (r != 0)
            return r;
        r = vrpc_cli_wait(cli, timeout_ms, extra_fd);
        if (r == 0 || r == -EINTR)
            return 0;
        if (r < 0) {
            /* closed or hung up (a killed server never sets SERVER_CLOSED): a reply published
             * before that still counts, else the channel is gone */
            int got = vrpc_cli_reap(cli, out, 1);
            return got != 0 ? got : (r == -EPIPE ? -EPIPE : r);
        }
    }
}

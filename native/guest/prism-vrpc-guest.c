/* prism-vrpc-guest: a VM's NFS client over its VRPC ring, from inside a QEMU guest.
 *
 * The host gives the guest its VM's guest channel (`prism vm vrpc-guest NAME` prints the QEMU
 * options) as an ivshmem-plain PCI device, vendor 1af4 device 1110, whose BAR 2 is the ring
 * segment. This program finds the device in sysfs, enables it, maps `resource2` and speaks
 * ONC-RPC over the ring in poll mode (no interrupts: the server polls the SQ, we poll the CQ),
 * using native/vrpc_ring.c for the ring itself. It mounts the export and runs a fixed
 * workload, printing one `R key=value` line per result for a test to check:
 *
 *   prism-vrpc-guest [--mem PATH] mnt EXPORT         MNT only: R mnt=<mountstat3>
 *   prism-vrpc-guest [--mem PATH] run EXPORT NAME    MNT, NULL (then NULL_ROUNDS timed, the
 *                                                    mean round trip in R null_us), GETATTR,
 *                                                    CREATE NAME, WRITE
 *                                                    GUEST_BYTES in GUEST_CHUNK calls (FILE_SYNC),
 *                                                    READ back, READDIR, then PRISM-VRPC-GUEST ok
 *   prism-vrpc-guest [--mem PATH] soak EXPORT NAME SECONDS
 *                                                    MNT, CREATE NAME, then for SECONDS: WRITE
 *                                                    chunk r at r * GUEST_CHUNK, READ it back
 *                                                    and compare (R soaking=1 once under way)
 *
 * `--mem PATH` maps PATH instead of the PCI BAR (a host test maps the ring's file, as QEMU
 * does). Data byte i is pattern(i) below; sums are FNV-1a 64 in hex. A server restart resets
 * the ring (new boot and channel ids in its header, SERVER_CLOSED meanwhile if it stopped
 * cleanly): the client then opens the ring again, checked as at first (R reset=<channel>), and
 * sends its call again from its private copy, as an NFS client retransmits; it gives up after
 * CALL_TIMEOUT_MS without a reply or a reset, or at once if the ring is SERVER_GONE (its VM
 * was removed). Build on the host, static:
 *   gcc -O2 -static -Inative -o prism-vrpc-guest native/guest/prism-vrpc-guest.c native/vrpc_ring.c
 * Everything read from the ring is bounds-checked: the reply is copied out of the slot once,
 * then parsed from the copy. Exit status: 0 ok, 1 a failed step (the line says which), 2 usage.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "vrpc.h"

#define MOUNT_PROG 100005u
#define NFS_PROG 100003u
#define V3 3u
#define MNT_PROC 1u
#define NFS_NULL 0u
#define NFS_GETATTR 1u
#define NFS_READ 6u
#define NFS_WRITE 7u
#define NFS_CREATE 8u
#define NFS_READDIR 16u
#define FH_MAX 64u
#define NAME_MAX_XDR 255u
#define FATTR3_BYTES 84u
#define GUEST_CHUNK 65536u
#define GUEST_BYTES (4u * GUEST_CHUNK + 1234u)
#define CALL_TIMEOUT_MS 60000
#define REPLY_MAX (GUEST_CHUNK + 4096u)
#define NULL_ROUNDS 200
#define SPIN_NS 2000000u
#define SOAK_CHUNK 4096u
#define SOAK_PAUSE_NS 5000000L

static struct vrpc_cli cli;
static void *ring_base;
static uint64_t ring_bytes;
static uint32_t next_xid = 0x50524700;
static uint8_t reply_copy[REPLY_MAX];
static uint8_t call_copy[REPLY_MAX]; /* the call being made, sent again after a reset */

static void fail(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    printf("R error=");
    vprintf(fmt, ap);
    printf("\n");
    va_end(ap);
    fflush(stdout);
    exit(1);
}

static uint8_t pattern(uint32_t i) { return (uint8_t)(i * 131u + (i >> 8) + 7u); }

static uint64_t fnv1a(uint64_t h, const uint8_t *p, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        h ^= p[i];
        h *= 0x100000001b3ULL;
    }
    return h;
}
#define FNV_BASIS 0xcbf29ce484222325ULL

/* ---- XDR writer over a slot, reader over the private copy -------------------------------- */

struct xw { uint8_t *p; uint32_t n, cap; };
struct xr { const uint8_t *p; uint32_t n, off; };

static void put_u32(struct xw *w, uint32_t v)
{
    if (w->cap - w->n < 4)
        fail("call too long");
    w->p[w->n++] = v >> 24;
    w->p[w->n++] = v >> 16;
    w->p[w->n++] = v >> 8;
    w->p[w->n++] = v;
}
static void put_u64(struct xw *w, uint64_t v) { put_u32(w, v >> 32); put_u32(w, (uint32_t)v); }
static void put_opaque(struct xw *w, const void *data, uint32_t len)
{
    uint32_t pad = (4 - (len & 3)) & 3;
    put_u32(w, len);
    if (w->cap - w->n < len + pad)
        fail("call too long");
    memcpy(w->p + w->n, data, len);
    memset(w->p + w->n + len, 0, pad);
    w->n += len + pad;
}

static uint32_t get_u32(struct xr *r)
{
    if (r->n - r->off < 4)
        fail("reply truncated at byte %u", r->off);
    const uint8_t *q = r->p + r->off;
    r->off += 4;
    return (uint32_t)q[0] << 24 | (uint32_t)q[1] << 16 | (uint32_t)q[2] << 8 | q[3];
}
static uint64_t get_u64(struct xr *r) { uint64_t hi = get_u32(r); return hi << 32 | get_u32(r); }
static void skip(struct xr *r, uint32_t len)
{
    if (r->n - r->off < len)
        fail("reply truncated at byte %u", r->off);
    r->off += len;
}
/* A variable-length opaque of at most max bytes: its length; *data points into the copy. */
static uint32_t get_opaque(struct xr *r, uint32_t max, const uint8_t **data)
{
    uint32_t len = get_u32(r);
    if (len > max)
        fail("reply opaque of %u bytes, more than %u", len, max);
    *data = r->p + r->off;
    skip(r, len + ((4 - (len & 3)) & 3));
    return len;
}
static void skip_post_op_attr(struct xr *r)
{
    if (get_u32(r))
        skip(r, FATTR3_BYTES);
}
static void skip_wcc_data(struct xr *r)
{
    if (get_u32(r))
        skip(r, 24); /* wcc_attr: size, mtime, ctime */
    skip_post_op_attr(r);
}

/* ---- one RPC over the ring ---------------------------------------------------------------- */

/* The call header (AUTH_SYS root, AUTH_NONE verifier) into the private copy; args follow. */
static struct xw begin_call(uint32_t prog, uint32_t proc, uint32_t xid)
{
    struct xw w = {call_copy, 0, sizeof call_copy};
    static const char machine[] = "prism-guest";
    put_u32(&w, xid);
    put_u32(&w, 0);  /* CALL */
    put_u32(&w, 2);  /* RPC version */
    put_u32(&w, prog);
    put_u32(&w, V3);
    put_u32(&w, proc);
    put_u32(&w, 1);  /* AUTH_SYS */
    put_u32(&w, 4 * 5 + 12);
    put_u32(&w, 0);  /* stamp */
    put_opaque(&w, machine, sizeof machine - 1);
    put_u32(&w, 0);  /* uid */
    put_u32(&w, 0);  /* gid */
    put_u32(&w, 0);  /* no extra gids */
    put_u32(&w, 0);  /* verifier AUTH_NONE */
    put_u32(&w, 0);
    return w;
}

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static void resync(void);

/* Whether the server reset the ring since we opened it: its magic is being rewritten, or its
 * boot or channel id changed (a restarted server, or a new channel over the same memory). */
static int ring_was_reset(void)
{
    if (__atomic_load_n(&cli.hdr->magic, __ATOMIC_ACQUIRE) != (uint64_t)VRPC_RING_MAGIC)
        return 1;
    return __atomic_load_n(&cli.hdr->boot_id, __ATOMIC_RELAXED) != cli.boot_id ||
           __atomic_load_n(&cli.hdr->channel_id, __ATOMIC_RELAXED) != cli.channel_id;
}

static void pause_ns(long ns)
{
    struct timespec ts = {0, ns};
    nanosleep(&ts, NULL);
}

/* Open the reset ring again, validated as at first (vrpc_cli_open), once its new header is
 * complete, and start after what the new server has. */
static void reattach(uint64_t deadline)
{
    uint64_t boot_id = cli.boot_id, channel_id = cli.channel_id;
    for (;;) {
        struct vrpc_cli fresh;
        int rc = vrpc_cli_open(&fresh, ring_base, ring_bytes, -1, -1);
        if (rc == 0 && (fresh.boot_id != boot_id || fresh.channel_id != channel_id)) {
            if (fresh.doorbell != VRPC_DOORBELL_POLL)
                fail("the reset ring is not a guest (poll-mode) channel");
            cli = fresh;
            resync();
            printf("R reset=%" PRIu64 "\n", cli.channel_id);
            return;
        }
        if (now_ns() > deadline)
            fail("the ring was reset but never became usable again");
        pause_ns(1000000);
    }
}

/* Poll until our call's completion is there (1) or the ring was reset (0): spin for SPIN_NS
 * (a reply usually comes that soon; the guest has nothing else to run), then sleep backing
 * off to 1 ms. A closed ring is waited on for its reset (the server stopped, or will make the
 * channel again), unless it is GONE. */
static int await_completion(uint64_t deadline)
{
    uint64_t spin_until = now_ns() + SPIN_NS;
    long sleep_ns = 20000;
    for (;;) {
        for (int i = 0; i < 64; i++) {
            if (ring_was_reset())
                return 0;
            if (__atomic_load_n(&cli.hdr->cq_tail, __ATOMIC_ACQUIRE) != cli.cq_head)
                return ring_was_reset() ? 0 : 1; /* (a reset rewrites the ids first) */
            __builtin_ia32_pause();
        }
        uint32_t flags = __atomic_load_n(&cli.hdr->server_flags, __ATOMIC_ACQUIRE);
        if (flags & VRPC_SERVER_GONE)
            fail("the server closed the channel for good (its VM was removed)");
        uint64_t now = now_ns();
        if (now > deadline)
            fail(flags & VRPC_SERVER_CLOSED
                     ? "the server closed the channel and did not come back in %d ms"
                     : "no reply in %d ms",
                 CALL_TIMEOUT_MS);
        if (now >= spin_until) {
            pause_ns(sleep_ns);
            sleep_ns = sleep_ns * 2 > 1000000 ? 1000000 : sleep_ns * 2;
        }
    }
}

/* Copy the call into slot 0, submit it, poll for its completion (sending it again after a
 * reset or a NOREPLY), copy the reply out once and check the RPC header: a reader over the
 * procedure's result. */
static struct xr finish_call(struct xw *w, uint32_t xid)
{
    uint64_t deadline = now_ns() + (uint64_t)CALL_TIMEOUT_MS * 1000000u;
    for (int attempt = 0;; attempt++) {
        if (ring_was_reset())
            reattach(deadline);
        if (w->n > cli.slot_size)
            fail("call of %u bytes, more than a slot", w->n);
        memcpy(cli.slots, call_copy, w->n);
        int rc = vrpc_cli_submit(&cli, 0, w->n);
        if (rc < 0 && rc != -EPIPE)
            fail("submit: %s", strerror(-rc));
        if (!await_completion(deadline) || rc < 0) {
            if (rc == 0 && !ring_was_reset())
                fail("a completion on a closed ring");
            reattach(deadline); /* not a ring of ours any more: the call goes again */
            continue;
        }
        struct vrpc_cqe cqe;
        rc = vrpc_cli_reap(&cli, &cqe, 1);
        if (rc != 1) {
            if (ring_was_reset()) {
                reattach(deadline);
                continue;
            }
            fail("reap: %s", rc < 0 ? strerror(-rc) : "no completion");
        }
        if (cqe.flags & VRPC_CQE_NOREPLY) { /* the server will answer a resend */
            if (attempt > 100)
                fail("no reply after %d resends", attempt);
            pause_ns(10000000);
            continue;
        }
        if (cqe.len > sizeof reply_copy)
            fail("reply of %u bytes, more than %zu", cqe.len, sizeof reply_copy);
        memcpy(reply_copy, cli.slots, cqe.len); /* the one copy */
        struct xr r = {reply_copy, cqe.len, 0};
        if (get_u32(&r) != xid)
            fail("reply to another xid");
        if (get_u32(&r) != 1 || get_u32(&r) != 0)
            fail("not an accepted reply");
        get_u32(&r); /* verifier flavor */
        const uint8_t *verf;
        get_opaque(&r, 400, &verf);
        uint32_t accept = get_u32(&r);
        if (accept != 0)
            fail("accept_stat %u", accept);
        return r;
    }
}

/* ---- the workload ------------------------------------------------------------------------- */

struct fh { uint32_t len; uint8_t data[FH_MAX]; };

static void copy_fh(struct fh *fh, const uint8_t *data, uint32_t len)
{
    fh->len = len;
    memcpy(fh->data, data, len);
}

static uint32_t mnt(const char *export, struct fh *root)
{
    uint32_t xid = next_xid++;
    struct xw w = begin_call(MOUNT_PROG, MNT_PROC, xid);
    put_opaque(&w, export, (uint32_t)strlen(export));
    struct xr r = finish_call(&w, xid);
    uint32_t status = get_u32(&r);
    if (status == 0) {
        const uint8_t *data;
        uint32_t len = get_opaque(&r, FH_MAX, &data);
        copy_fh(root, data, len);
    }
    return status;
}

static uint32_t nfs_status(struct xr *r, const char *what)
{
    uint32_t status = get_u32(r);
    if (status != 0) {
        printf("R %s=%u\n", what, status);
        fail("%s failed with nfsstat3 %u", what, status);
    }
    return status;
}

static void create(const struct fh *dir, const char *name, struct fh *file)
{
    uint32_t xid = next_xid++;
    struct xw w = begin_call(NFS_PROG, NFS_CREATE, xid);
    put_opaque(&w, dir->data, dir->len);
    put_opaque(&w, name, (uint32_t)strlen(name));
    put_u32(&w, 0);       /* UNCHECKED */
    put_u32(&w, 1);       /* set_mode */
    put_u32(&w, 0644);
    for (int i = 0; i < 5; i++)
        put_u32(&w, 0);   /* uid, gid, size, atime, mtime unchanged */
    struct xr r = finish_call(&w, xid);
    nfs_status(&r, "create");
    if (!get_u32(&r))
        fail("CREATE returned no handle");
    const uint8_t *data;
    uint32_t len = get_opaque(&r, FH_MAX, &data);
    copy_fh(file, data, len);
}

static void write_sync(const struct fh *file, uint64_t offset, const uint8_t *data, uint32_t n)
{
    uint32_t xid = next_xid++;
    struct xw w = begin_call(NFS_PROG, NFS_WRITE, xid);
    put_opaque(&w, file->data, file->len);
    put_u64(&w, offset);
    put_u32(&w, n);
    put_u32(&w, 2);   /* FILE_SYNC */
    put_opaque(&w, data, n);
    struct xr r = finish_call(&w, xid);
    nfs_status(&r, "write");
    skip_wcc_data(&r);
    uint32_t count = get_u32(&r);
    if (count != n)
        fail("WRITE wrote %u of %u bytes", count, n);
}

/* READ count bytes at offset: the bytes read (*data points into the reply copy). */
static uint32_t read_at(const struct fh *file, uint64_t offset, uint32_t count,
                        const uint8_t **data, uint32_t *eof)
{
    uint32_t xid = next_xid++;
    struct xw w = begin_call(NFS_PROG, NFS_READ, xid);
    put_opaque(&w, file->data, file->len);
    put_u64(&w, offset);
    put_u32(&w, count);
    struct xr r = finish_call(&w, xid);
    nfs_status(&r, "read");
    skip_post_op_attr(&r);
    get_u32(&r);      /* count (the opaque says it again) */
    *eof = get_u32(&r);
    return get_opaque(&r, count, data);
}

static void run(const char *export, const char *name)
{
    struct fh root, file;
    uint32_t status = mnt(export, &root);
    printf("R mnt=%u\n", status);
    if (status != 0)
        fail("MNT %s: mountstat3 %u", export, status);

    uint32_t xid = next_xid++;
    struct xw w = begin_call(NFS_PROG, NFS_NULL, xid);
    finish_call(&w, xid);
    printf("R null=ok\n");
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (int i = 0; i < NULL_ROUNDS; i++) {
        xid = next_xid++;
        w = begin_call(NFS_PROG, NFS_NULL, xid);
        finish_call(&w, xid);
    }
    clock_gettime(CLOCK_MONOTONIC, &t1);
    double us = ((double)(t1.tv_sec - t0.tv_sec) * 1e9 + (double)(t1.tv_nsec - t0.tv_nsec)) / 1e3;
    printf("R null_rounds=%d null_us=%.1f\n", NULL_ROUNDS, us / NULL_ROUNDS);

    xid = next_xid++;
    w = begin_call(NFS_PROG, NFS_GETATTR, xid);
    put_opaque(&w, root.data, root.len);
    struct xr r = finish_call(&w, xid);
    nfs_status(&r, "getattr");
    printf("R root_type=%u\n", get_u32(&r));

    create(&root, name, &file);
    printf("R create=0\n");

    static uint8_t chunk[GUEST_CHUNK];
    uint64_t sum = FNV_BASIS;
    uint32_t written = 0;
    while (written < GUEST_BYTES) {
        uint32_t n = GUEST_BYTES - written < GUEST_CHUNK ? GUEST_BYTES - written : GUEST_CHUNK;
        for (uint32_t i = 0; i < n; i++)
            chunk[i] = pattern(written + i);
        sum = fnv1a(sum, chunk, n);
        write_sync(&file, written, chunk, n);
        written += n;
    }
    printf("R written=%u write_sum=%016" PRIx64 "\n", written, sum);

    uint64_t offset = 0, rsum = FNV_BASIS;
    const uint8_t *data;
    for (;;) {
        uint32_t eof;
        uint32_t n = read_at(&file, offset, GUEST_CHUNK, &data, &eof);
        rsum = fnv1a(rsum, data, n);
        offset += n;
        if (eof || n == 0)
            break;
    }
    printf("R read=%" PRIu64 " read_sum=%016" PRIx64 "\n", offset, rsum);

    uint64_t cookie = 0;
    uint8_t verf[8] = {0};
    unsigned entries = 0;
    for (int pages = 0; pages < 1000; pages++) {
        xid = next_xid++;
        w = begin_call(NFS_PROG, NFS_READDIR, xid);
        put_opaque(&w, root.data, root.len);
        put_u64(&w, cookie);
        memcpy(w.p + w.n, verf, 8);
        w.n += 8;
        put_u32(&w, 4096);
        r = finish_call(&w, xid);
        nfs_status(&r, "readdir");
        skip_post_op_attr(&r);
        const uint8_t *v;
        if (r.n - r.off < 8)
            fail("READDIR reply truncated");
        v = r.p + r.off;
        memcpy(verf, v, 8);
        skip(&r, 8);
        while (get_u32(&r)) {
            get_u64(&r);  /* fileid */
            const uint8_t *nm;
            uint32_t nlen = get_opaque(&r, NAME_MAX_XDR, &nm);
            cookie = get_u64(&r);
            printf("R entry=%.*s\n", (int)nlen, (const char *)nm);
            entries++;
        }
        if (get_u32(&r))
            break;
    }
    printf("R entries=%u\n", entries);
    printf("PRISM-VRPC-GUEST ok\n");
}

/* Write and read back SOAK_CHUNK-byte chunks for `seconds` (a server restart meanwhile is
 * the point: every call must go through, resent after the ring's reset). */
static void soak(const char *export, const char *name, unsigned seconds)
{
    struct fh root, file;
    uint32_t status = mnt(export, &root);
    if (status != 0)
        fail("MNT %s: mountstat3 %u", export, status);
    create(&root, name, &file);
    printf("R soaking=1\n");
    static uint8_t chunk[SOAK_CHUNK];
    uint64_t until = now_ns() + (uint64_t)seconds * 1000000000u, sum = FNV_BASIS;
    uint32_t rounds = 0;
    while (now_ns() < until) {
        uint64_t offset = (uint64_t)rounds * SOAK_CHUNK;
        for (uint32_t i = 0; i < SOAK_CHUNK; i++)
            chunk[i] = pattern((uint32_t)offset + i);
        write_sync(&file, offset, chunk, SOAK_CHUNK);
        const uint8_t *data;
        uint32_t eof;
        if (read_at(&file, offset, SOAK_CHUNK, &data, &eof) != SOAK_CHUNK ||
            memcmp(data, chunk, SOAK_CHUNK) != 0)
            fail("round %u read back other bytes", rounds);
        sum = fnv1a(sum, chunk, SOAK_CHUNK);
        rounds++;
        pause_ns(SOAK_PAUSE_NS);
    }
    printf("R soak_rounds=%u soak_bytes=%" PRIu64 " soak_sum=%016" PRIx64 "\n", rounds,
           (uint64_t)rounds * SOAK_CHUNK, sum);
    printf("PRISM-VRPC-GUEST ok\n");
}

/* A previous client of this ring (the last run, or one killed mid-call) may have calls still
 * completing: wait until every submission has its completion, then start after them. On a
 * closed ring none will come: start after them at once (the first call then waits for the
 * reset), unless it is closed for good. */
static void resync(void)
{
    for (int i = 0; i < 5000; i++) {
        uint32_t flags = __atomic_load_n(&cli.hdr->server_flags, __ATOMIC_ACQUIRE);
        if (flags & VRPC_SERVER_GONE)
            fail("the server closed the channel for good (its VM was removed)");
        uint32_t sq = __atomic_load_n(&cli.hdr->sq_tail, __ATOMIC_ACQUIRE);
        uint32_t cq = __atomic_load_n(&cli.hdr->cq_tail, __ATOMIC_ACQUIRE);
        if (sq == cq || (flags & VRPC_SERVER_CLOSED)) {
            cli.sq_tail = sq;
            cli.cq_head = cq;
            __atomic_store_n(&cli.hdr->cq_head, cq, __ATOMIC_RELEASE);
            return;
        }
        struct timespec ts = {0, 1000000};
        nanosleep(&ts, NULL);
    }
    fail("the ring's previous client left calls that never completed");
}

/* ---- finding and mapping the ring -------------------------------------------------------- */

static int read_hex(const char *dir, const char *file, unsigned *out)
{
    char path[512], buf[32];
    snprintf(path, sizeof path, "%s/%s", dir, file);
    FILE *f = fopen(path, "r");
    if (!f)
        return -1;
    int ok = fgets(buf, sizeof buf, f) != NULL;
    fclose(f);
    if (!ok)
        return -1;
    *out = (unsigned)strtoul(buf, NULL, 16);
    return 0;
}

/* The path of the first ivshmem device's BAR 2 (enabled), or NULL. */
static const char *find_bar(void)
{
    static char path[512];
    const char *base = "/sys/bus/pci/devices";
    DIR *d = opendir(base);
    if (!d)
        return NULL;
    struct dirent *e;
    while ((e = readdir(d)) != NULL) {
        char dev[300];
        unsigned vendor, device;
        if (e->d_name[0] == '.')
            continue;
        snprintf(dev, sizeof dev, "%s/%s", base, e->d_name);
        if (read_hex(dev, "vendor", &vendor) || read_hex(dev, "device", &device))
            continue;
        if (vendor != 0x1af4 || device != 0x1110)
            continue;
        snprintf(path, sizeof path, "%s/enable", dev);
        int fd = open(path, O_WRONLY);
        if (fd >= 0) {
            if (write(fd, "1", 1) < 0 && errno != EBUSY)
                printf("R warning=enable %s: %s\n", e->d_name, strerror(errno));
            close(fd);
        }
        snprintf(path, sizeof path, "%s/resource2", dev);
        printf("R device=%s\n", e->d_name);
        closedir(d);
        return path;
    }
    closedir(d);
    return NULL;
}

int main(int argc, char **argv)
{
    const char *mem = NULL;
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (argc > 2 && strcmp(argv[1], "--mem") == 0) {
        mem = argv[2];
        argv += 2;
        argc -= 2;
    }
    int is_run = argc == 4 && strcmp(argv[1], "run") == 0;
    int is_soak = argc == 5 && strcmp(argv[1], "soak") == 0;
    if (!is_run && !is_soak && !(argc == 3 && strcmp(argv[1], "mnt") == 0)) {
        fprintf(stderr,
                "usage: %s [--mem PATH] mnt EXPORT | run EXPORT NAME | soak EXPORT NAME SECONDS\n",
                argv[0]);
        return 2;
    }
    if (mem == NULL && (mem = find_bar()) == NULL)
        fail("no ivshmem device (PCI 1af4:1110): start QEMU with `prism vm vrpc-guest` output");
    int fd = open(mem, O_RDWR | O_SYNC);
    if (fd < 0)
        fail("open %s: %s", mem, strerror(errno));
    struct stat st;
    if (fstat(fd, &st) < 0 || st.st_size <= 0)
        fail("size of %s unknown", mem);
    ring_bytes = (uint64_t)st.st_size;
    ring_base = mmap(NULL, (size_t)st.st_size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (ring_base == MAP_FAILED)
        fail("mmap %s: %s", mem, strerror(errno));
    int rc = vrpc_cli_open(&cli, ring_base, ring_bytes, -1, -1);
    if (rc < 0)
        fail("not a usable VRPC ring: %s", strerror(-rc));
    if (cli.doorbell != VRPC_DOORBELL_POLL)
        fail("the ring is not a guest (poll-mode) channel");
    resync();
    printf("R channel=%" PRIu64 " size=%" PRIu64 " slots=%u\n", cli.channel_id,
           cli.segment_size, cli.nslots);
    if (is_run) {
        run(argv[2], argv[3]);
    } else if (is_soak) {
        soak(argv[2], argv[3], (unsigned)strtoul(argv[4], NULL, 10));
    } else {
        struct fh root;
        printf("R mnt=%u\n", mnt(argv[2], &root));
    }
    return 0;
}

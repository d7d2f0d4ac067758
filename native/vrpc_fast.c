/* The C fast path (design section 5.3): NFSv3 GETATTR and NULL answered from the VM's attribute
 * table without entering Python, byte-identical to what RpcDispatcher.handle_now would send.
 *
 * Invariants this file protects:
 * - Accept only what the Python path accepts, and answer exactly as it would: every check here
 *   is a subset of rpc.message.decode_call + the NFS row's decode + NfsService._oid. Anything
 *   unusual (other flavors, non-empty AUTH_NONE bodies, verifiers with bodies, trailing bytes,
 *   non-zero padding, a handle of another version) declines, and Python answers it.
 * - The record is copied out of the ring once, to the stack, before any byte is read (R2).
 * - A hit needs the table's fresh entry AND the server-private MAC of the handle it was
 *   published with: the table is per VM, so a hit also means the handle is of this VM.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stddef.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "vrpc.h"

#define RPC_CALL 0
#define RPC_VERSION 2
#define NFS_PROGRAM 100003
#define AUTH_NONE 0
#define AUTH_SYS 1
#define MAX_AUTH_BYTES 400
#define MAX_MACHINENAME 255
#define MAX_GIDS 16
#define HANDLE_SIZE 31
#define HANDLE_VERSION 1

static inline uint32_t be32(const uint8_t *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

static inline void put32(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)(v >> 24);
    p[1] = (uint8_t)(v >> 16);
    p[2] = (uint8_t)(v >> 8);
    p[3] = (uint8_t)v;
}

static int zero_pad(const uint8_t *p, uint32_t n)
{
    for (uint32_t i = n; i & 3; i++)
        if (p[i])
            return 0;
    return 1;
}

/* AuthSys.unpack's rules on a body of n bytes: stamp, machinename<255>, uid, gid, gids<16>. */
static int auth_sys_ok(const uint8_t *b, uint32_t n)
{
    uint32_t off = 4;
    if (n < 8)
        return 0;
    uint32_t mlen = be32(b + off);
    off += 4;
    if (mlen > MAX_MACHINENAME || mlen > n - off)
        return 0;
    uint32_t padded = (mlen + 3) & ~3u;
    if (padded > n - off || !zero_pad(b + off, mlen))
        return 0;
    off += padded;
    if (n - off < 12)
        return 0;
    off += 8; /* uid, gid */
    uint32_t ngids = be32(b + off);
    off += 4;
    if (ngids > MAX_GIDS || (uint64_t)ngids * 4 != (uint64_t)(n - off))
        return 0;
    return 1;
}

int vrpc_fast_answer(const struct vrpc_meta *m, const uint8_t *rec, uint32_t len, uint8_t *out)
{
    if (len < 40 || len > VRPC_FAST_MAX_RECORD)
        return 0;
    uint32_t xid = be32(rec), prog = be32(rec + 12), vers = be32(rec + 16), proc = be32(rec + 20);
    if (be32(rec + 4) != RPC_CALL || be32(rec + 8) != RPC_VERSION)
        return 0;
    int null = proc == 0 && vers == 3 && prog == NFS_PROGRAM; /* MOUNT: Python (registered?) */
    int getattr = proc == 1 && vers == 3 && prog == NFS_PROGRAM;
    if (!null && !getattr)
        return 0;
    uint32_t off = 24, flavor = be32(rec + off), clen = be32(rec + off + 4);
    off += 8;
    if (clen > MAX_AUTH_BYTES || ((clen + 3) & ~3u) > len - off || !zero_pad(rec + off, clen))
        return 0;
    if (flavor == AUTH_NONE) {
        if (clen != 0)
            return 0;
    } else if (flavor != AUTH_SYS || !auth_sys_ok(rec + off, clen)) {
        return 0;
    }
    off += (clen + 3) & ~3u;
    if (len - off < 8 || be32(rec + off) != AUTH_NONE || be32(rec + off + 4) != 0)
        return 0;
    off += 8;
    put32(out, xid);
    put32(out + 4, 1);  /* REPLY */
    put32(out + 8, 0);  /* MSG_ACCEPTED */
    put32(out + 12, 0); /* verifier AUTH_NONE */
    put32(out + 16, 0); /* of length 0 */
    put32(out + 20, 0); /* SUCCESS */
    if (null)
        return off == len ? VRPC_FAST_NULL_REPLY : 0;
    /* GETATTR3args: nfs_fh3 = opaque<64> of HANDLE_SIZE bytes, padded, nothing after */
    if (!m || len - off != 4 + ((HANDLE_SIZE + 3) & ~3u) || be32(rec + off) != HANDLE_SIZE)
        return 0;
    const uint8_t *fh = rec + off + 4;
    if (!zero_pad(fh, HANDLE_SIZE) || fh[0] != HANDLE_VERSION)
        return 0;
    uint32_t ns = be32(fh + 1);
    uint16_t vol = (uint16_t)(fh[5] << 8 | fh[6]);
    uint64_t ino = (uint64_t)be32(fh + 7) << 32 | be32(fh + 11);
    if (vrpc_meta_lookup(m, ns, vol, ino, out + 28, fh + 15) < 0)
        return 0;
    put32(out + 24, 0); /* NFS3_OK */
    return VRPC_FAST_GETATTR_REPLY;
}

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

int vrpc_srv_drain_fast(struct vrpc_srv *srv, const struct vrpc_meta *m, struct vrpc_work *work,
                        uint32_t max, struct vrpc_fast_stats *st)
{
    int n = vrpc_srv_drain(srv, work, max);
    if (n <= 0)
        return n;
    st->drained += (uint64_t)n;
    uint64_t t0 = now_ns();
    int kept = 0, answered = 0;
    for (int i = 0; i < n; i++) {
        uint32_t slot = work[i].slot, len = work[i].len;
        if (len <= VRPC_FAST_MAX_RECORD) {
            uint8_t rec[VRPC_FAST_MAX_RECORD], reply[VRPC_FAST_GETATTR_REPLY];
            memcpy(rec, srv->slots + (uint64_t)slot * srv->slot_size, len); /* R2 */
            int r = vrpc_fast_answer(m, rec, len, reply);
            if (r > 0 && vrpc_srv_complete(srv, slot, reply, (uint32_t)r, VRPC_CQE_FAST) >= 0) {
                if (r == VRPC_FAST_NULL_REPLY)
                    st->null++;
                else
                    st->getattr++;
                answered++;
                continue;
            }
        }
        work[kept++] = work[i];
    }
    if (answered)
        st->ns += now_ns() - t0;
    return kept;
}

int vrpc_srv_pump(struct vrpc_srv *srv, const struct vrpc_meta *m, int fast, int kick_fd,
                  struct vrpc_work *work, uint32_t max, struct vrpc_fast_stats *st,
                  uint32_t *state)
{
    uint64_t value;
    if (kick_fd >= 0 && read(kick_fd, &value, sizeof value) < 0 && errno != EAGAIN &&
        errno != EINTR)
        return -errno;
    vrpc_srv_disarm(srv);
    uint32_t left = max;
    *state = VRPC_PUMP_MORE;
    for (;;) {
        int n;
        if (fast) {
            uint64_t before = st->drained;
            n = vrpc_srv_drain_fast(srv, m, work, left, st);
            if (n < 0)
                return n;
            left -= (uint32_t)(st->drained - before);
        } else {
            n = vrpc_srv_drain(srv, work, left);
            if (n < 0)
                return n;
            st->drained += (uint64_t)n;
            left -= (uint32_t)n;
        }
        if (n > 0 || left == 0)
            return n; /* Python's records first, or the batch is spent: MORE */
        if (!vrpc_srv_arm(srv)) {
            *state = VRPC_PUMP_ARMED;
            return 0;
        }
        vrpc_srv_disarm(srv); /* work slipped in between the drain and the arm (R4) */
    }
}

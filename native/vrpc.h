/* Prism VRPC shared-memory ABI 1.0: the single source of the ring, metadata-table and epoch-file
 * layouts (design: ../../shared/design/vrpc.md sections 4 and 7; native/README.md).
 *
 * All integers are native-endian (the peers share a host; the guest case is x86-on-x86). RPC
 * records inside slots are XDR (big-endian) exactly as on the wire. Fields marked [S] are written
 * by the server, [C] by the client; each side keeps private copies of what it writes and never
 * trusts the other side's words beyond validating them.
 *
 * The text between the CDEF markers is fed verbatim to cffi's ffibuilder.cdef() by
 * vrpc/_build.py: keep it to plain declarations and "#define NAME <integer>" lines (cdef rejects
 * every other directive). Offsets are pinned by _Static_assert in vrpc_abi.c and by
 * tests/test_vrpc_abi.py against vrpc/abi.py, the Python mirror used by the pure-Python backend.
 *
 * C rules: no Python API calls, no allocation (callers pass every buffer and struct), results are
 * >= 0 or a negative errno.
 */
#ifndef PRISM_VRPC_H
#define PRISM_VRPC_H

#include <stdint.h>

/* CDEF-BEGIN */
#define VRPC_RING_MAGIC       0x3152564D53495250
#define VRPC_META_MAGIC       0x31544D4D53495250
#define VRPC_EPOCH_MAGIC      0x3150454D53495250
#define VRPC_ABI_MAJOR        1
#define VRPC_ABI_MINOR        0
#define VRPC_HEADER_SIZE      4096
#define VRPC_SLOT_SIZE        1114112
#define VRPC_MAX_SLOTS        64
#define VRPC_MAX_ENTRIES      128
#define VRPC_DOORBELL_EVENTFD 1
#define VRPC_DOORBELL_POLL    2
#define VRPC_CLIENT_WAITING   1
#define VRPC_SERVER_IDLE      1
#define VRPC_SERVER_CLOSED    2
#define VRPC_SERVER_GONE      4
#define VRPC_CQE_NOREPLY      1
#define VRPC_CQE_FAST         2
#define VRPC_F_FASTPATH       1
#define VRPC_F_META           2
#define VRPC_ATTR_VALID       1
#define VRPC_ATTR_READONLY    2
#define VRPC_ERR_SQ_OVERRUN   1
#define VRPC_ERR_SQE_FLAGS    2
#define VRPC_ERR_SQE_SLOT     3
#define VRPC_ERR_SQE_LEN      4
#define VRPC_ERR_SLOT_BUSY    5
#define VRPC_META_HEADER_SIZE 4096
#define VRPC_ATTR_ENTRY_SIZE  128
#define VRPC_FATTR3_SIZE      84
#define VRPC_MAC_SIZE         16
#define VRPC_META_MIN_BUCKETS 2
#define VRPC_META_MAX_BUCKETS 1048576
#define VRPC_EPOCH_SIZE       4096
#define VRPC_FAST_MAX_RECORD  512
#define VRPC_FAST_GETATTR_REPLY 112
#define VRPC_FAST_NULL_REPLY  24
#define VRPC_PUMP_MORE        1
#define VRPC_PUMP_ARMED       2

/* Ring segment: [0, 4096) header, [4096, 8192) SQ then CQ (16-byte entries, entries <= 128),
 * [8192, 8192 + nslots * slot_size) slots. VRPC_MAGIC = "PRISMVR1", META "PRISMMT1",
 * EPOCH "PRISMEP1" (little-endian u64). Indices are free-running uint32; entry at idx & (entries-1). */
struct vrpc_ring_header {
    uint64_t magic;                /* [S, once] VRPC_RING_MAGIC                          @0   */
    uint16_t abi_major;            /* [S, once]                                          @8   */
    uint16_t abi_minor;            /*                                                    @10  */
    uint32_t header_size;          /* 4096                                               @12  */
    uint64_t segment_size;         /* bytes; page multiple                               @16  */
    uint64_t boot_id;              /* store.boot_id of the server run                    @24  */
    uint64_t channel_id;           /*                                                    @32  */
    uint32_t sq_offset;            /* 4096                                               @40  */
    uint32_t cq_offset;            /* 4096 + 16 * entries                                @44  */
    uint32_t entries;              /* SQ and CQ size, power of 2, nslots..128            @48  */
    uint32_t nslots;               /* 1..VRPC_MAX_SLOTS                                  @52  */
    uint32_t slot_offset;          /* 8192                                               @56  */
    uint32_t slot_size;            /* VRPC_SLOT_SIZE (rpc.record.MAX_RECORD_SIZE)        @60  */
    uint32_t doorbell;             /* VRPC_DOORBELL_*                                    @64  */
    uint32_t features;             /* VRPC_F_* granted                                   @68  */
    uint8_t  reserved0[56];        /*                                                    @72  */
    uint32_t sq_tail;              /* [C] submissions published                          @128 */
    uint32_t client_flags;         /* [C] VRPC_CLIENT_WAITING                            @132 */
    uint8_t  reserved1[56];
    uint32_t sq_head;              /* [S] submissions consumed                           @192 */
    uint32_t server_flags;         /* [S] VRPC_SERVER_IDLE | _CLOSED | _GONE             @196 */
    uint8_t  reserved2[56];
    uint32_t cq_tail;              /* [S] completions published                          @256 */
    uint8_t  reserved3[60];
    uint32_t cq_head;              /* [C] completions consumed (the server ignores it)   @320 */
    uint8_t  reserved4[3772];      /* -> 4096 */
};
struct vrpc_sqe { uint32_t slot; uint32_t len; uint32_t flags; uint32_t reserved; };
struct vrpc_cqe { uint32_t slot; uint32_t len; uint32_t flags; uint32_t reserved; };

/* Attribute table (section 7.2; published by phase 2): one sealed read-only memfd per VM. */
struct vrpc_meta_header {
    uint64_t magic;                /* VRPC_META_MAGIC                                    @0   */
    uint16_t abi_major;            /*                                                    @8   */
    uint16_t abi_minor;            /*                                                    @10  */
    uint32_t header_size;          /* 4096                                               @12  */
    uint32_t attr_offset;          /* 4096                                               @16  */
    uint32_t attr_buckets;         /* power of 2; a key lives in bucket b or b^1         @20  */
    uint32_t dent_offset;          /* 0 in ABI 1.0                                       @24  */
    uint32_t dent_buckets;         /*                                                    @28  */
    uint32_t vm_ns;                /*                                                    @32  */
    uint32_t reserved;             /*                                                    @36  */
    uint64_t boot_id;              /*                                                    @40  */
    uint8_t  pad0[80];             /* -> 128 */
    uint32_t table_epoch;          /* [S] bumped to invalidate the whole table           @128 */
    uint8_t  pad1[3964];           /* -> 4096 */
};
struct vrpc_attr_entry {           /* 128 bytes                                               */
    uint32_t seq;                  /* seqlock: odd while the server rewrites the entry   @0   */
    uint32_t store_epoch;          /* low 32 bits of epoch.begun when published          @4   */
    uint32_t table_epoch;          /* header table_epoch when published                  @8   */
    uint32_t flags;                /* VRPC_ATTR_*                                        @12  */
    uint32_t ns;                   /* key = the handle body fields                       @16  */
    uint16_t vol;                  /*                                                    @20  */
    uint16_t reserved;             /*                                                    @22  */
    uint64_t ino;                  /*                                                    @24  */
    uint64_t gen;                  /* server-wide publication counter                    @32  */
    uint8_t  fattr3[84];           /* XDR fattr3 exactly as GETATTR returns it           @40  */
    uint8_t  pad[4];               /* -> 128 */
};
struct vrpc_epoch_file {           /* DATA/meta/epoch, 4096 bytes, store-owned (7.5)          */
    uint64_t magic;                /* VRPC_EPOCH_MAGIC                                   @0   */
    uint8_t  pad0[56];
    uint64_t begun;                /* write transactions begun by non-journal processes  @64  */
    uint8_t  pad1[56];
    uint64_t ended;                /* ... and finished (committed or aborted)            @128 */
    uint8_t  pad2[3960];           /* -> 4096 */
};

/* Private state (server heap / client heap, never shared). Callers allocate; C fills it. */
struct vrpc_srv {
    struct vrpc_ring_header *hdr;
    uint8_t *sq;
    uint8_t *cq;
    uint8_t *slots;
    uint64_t segment_size;
    uint64_t inflight;             /* bit s: slot s handed to the caller, not completed yet */
    uint64_t calls;                /* SQEs accepted */
    uint32_t entries;
    uint32_t nslots;
    uint32_t slot_size;
    uint32_t sq_head;              /* private: next SQ index to consume */
    uint32_t cq_tail;              /* private: next CQ index to publish */
    uint32_t server_flags;         /* private copy of what the header shows */
    int32_t  call_fd;              /* eventfd written to wake the client; -1 in poll mode */
    uint32_t error;                /* VRPC_ERR_* of the first protocol error, 0 if none */
    uint32_t error_index;          /* SQ index of the offending entry */
    uint32_t error_value;          /* the offending word (tail, flags, slot or len) */
};
struct vrpc_cli {
    struct vrpc_ring_header *hdr;
    uint8_t *sq;
    uint8_t *cq;
    uint8_t *slots;
    uint64_t segment_size;
    uint64_t inflight;             /* bit s: slot s submitted, its CQE not reaped yet */
    uint64_t boot_id;
    uint64_t channel_id;
    uint32_t entries;
    uint32_t nslots;
    uint32_t slot_size;
    uint32_t doorbell;
    uint32_t features;
    uint32_t sq_tail;              /* private: next SQ index to publish */
    uint32_t cq_head;              /* private: next CQ index to consume */
    int32_t  kick_fd;              /* eventfd written to wake the server; -1 in poll mode */
    int32_t  call_fd;              /* eventfd the server writes; -1 in poll mode */
};
struct vrpc_work { uint32_t slot; uint32_t len; };

/* Geometry: bytes of a segment with nslots slots (0 if nslots is out of range). */
uint64_t vrpc_ring_size(uint32_t nslots);

/* Server. init writes the header of a zeroed, mapped segment and the private state; every
 * index starts at first_index (tests start near 2^32). Returns 0 or -EINVAL. */
int vrpc_srv_init(struct vrpc_srv *srv, void *base, uint64_t segment_size, uint32_t nslots,
                  uint32_t entries, uint32_t doorbell, uint32_t features, uint64_t boot_id,
                  uint64_t channel_id, int call_fd, uint32_t first_index);
/* Consume up to max SQEs (R1, R3), marking their slots in flight, into work[]: the count, or
 * -EPROTO after a protocol error (srv->error says which), or -EPIPE once closed. */
int vrpc_srv_drain(struct vrpc_srv *srv, struct vrpc_work *work, uint32_t max);
/* Copy len reply bytes into the in-flight slot (reply NULL: already there), publish the CQE and
 * write call_fd if the client sleeps (R4). 1 if it woke the client, 0 if not, -EINVAL for a slot
 * not in flight or len > slot_size, -EPIPE once closed (the slot is released, nothing written). */
int vrpc_srv_complete(struct vrpc_srv *srv, uint32_t slot, const void *reply, uint32_t len,
                      uint32_t flags);
/* Before sleeping on the kick fd: set SERVER_IDLE, fence, recheck the SQ (R4). 1 if work arrived
 * meanwhile (drain again), 0 if the client will kick. */
int vrpc_srv_arm(struct vrpc_srv *srv);
void vrpc_srv_disarm(struct vrpc_srv *srv);
/* Mark the channel closed (SERVER_CLOSED) and wake the client unconditionally. */
void vrpc_srv_close(struct vrpc_srv *srv);
/* Close it for good (SERVER_CLOSED | SERVER_GONE: no server will reset this ring again, e.g. a
 * guest ring whose VM was removed; a guest stops waiting for a reset) and wake the client. */
void vrpc_srv_retire(struct vrpc_srv *srv);

/* Client. open validates a mapped segment of mapped_size bytes: 0, -EBADMSG (magic),
 * -EPROTONOSUPPORT (ABI major), -EINVAL (inconsistent geometry). */
int vrpc_cli_open(struct vrpc_cli *cli, void *base, uint64_t mapped_size, int kick_fd,
                  int call_fd);
/* Publish the record already written into slot (R1) and kick a server that sleeps (R4): 1 if
 * kicked, 0 if not, -EINVAL (bad slot or len), -EBUSY (slot in flight), -EPIPE (closed). */
int vrpc_cli_submit(struct vrpc_cli *cli, uint32_t slot, uint32_t len);
/* Consume up to max CQEs into out[]: the count, -EPROTO for a CQE naming a slot not in flight,
 * a length beyond the slot or unknown flags, -EPIPE when closed and none are left. */
int vrpc_cli_reap(struct vrpc_cli *cli, struct vrpc_cqe *out, uint32_t max);
/* Sleep until a completion is ready (R4), timeout_ms passes (-1: forever) or extra_fd (the
 * control socket, -1: none) becomes readable or hangs up: 1 ready, 0 timeout, -EPIPE (server
 * closed or extra_fd), -EINTR (retry after handling signals), other -errno from poll. */
int vrpc_cli_wait(struct vrpc_cli *cli, int timeout_ms, int extra_fd);
/* One call with nothing else in flight, in one crossing from Python: submit the record already
 * written into slot (as vrpc_cli_submit), then reap and wait (as vrpc_cli_wait) until its
 * completion is in *out. 1 done; 0 when the wait ends first (timeout, -EINTR from poll: the
 * slot stays in flight, finish with reap/wait); -EINVAL, -EBUSY (another slot in flight),
 * -EPIPE, -EPROTO as submit and reap. */
int vrpc_cli_call(struct vrpc_cli *cli, uint32_t slot, uint32_t len, int timeout_ms,
                  int extra_fd, struct vrpc_cqe *out);
/* Attribute table (section 7; native/README.md "Attribute table"). Private state of one end:
 * the server's (macs: buckets * 16 bytes of its heap, never shared; the table mapped RW) or a
 * client's (macs NULL; the table mapped read-only). epoch maps DATA/meta/epoch (NULL: a table
 * used without one, tests only, which then never misses for an epoch). */
struct vrpc_meta {
    struct vrpc_meta_header *hdr;
    struct vrpc_attr_entry *attrs;
    struct vrpc_epoch_file *epoch;
    uint8_t *macs;
    uint64_t size;
    uint64_t gen;                  /* server: last publication counter */
    uint32_t buckets;
    uint32_t vm_ns;
    uint32_t table_epoch;          /* server: private copy of what the header shows */
    uint32_t reserved;
};

/* Bytes of a table with `buckets` entries (0 unless a power of 2 within the limits). */
uint64_t vrpc_meta_size(uint32_t buckets);
/* The even bucket b of a key; the key lives in b or b ^ 1. */
uint32_t vrpc_meta_bucket(uint32_t buckets, uint32_t ns, uint16_t vol, uint64_t ino);
/* Server: write the header of a zeroed, mapped table of `size` bytes. 0 or -EINVAL. */
int vrpc_meta_init(struct vrpc_meta *m, void *base, uint64_t size, uint32_t buckets,
                   uint32_t vm_ns, uint64_t boot_id, void *epoch, uint8_t *macs);
/* Client: validate a mapped table and epoch file. 0, -EBADMSG (magic), -EPROTONOSUPPORT (ABI
 * major), -EINVAL (geometry or sizes). */
int vrpc_meta_open(struct vrpc_meta *m, const void *base, uint64_t mapped_size,
                   const void *epoch, uint64_t epoch_size);
/* Server: write `fattr3` (84 bytes) for the key under the seqlock, stamped with the store epoch
 * epoch0 and the table epoch, and keep `mac` (16 bytes, or NULL) privately. With insert 0 only
 * a key already present (valid) is rewritten. The bucket index, -ENOENT (absent, insert 0) or
 * -ESTALE (the store epoch is not stable at epoch0: an external writer began since; nothing
 * written). */
int vrpc_meta_publish(struct vrpc_meta *m, uint32_t ns, uint16_t vol, uint64_t ino,
                      const uint8_t *fattr3, uint32_t flags, const uint8_t *mac, uint64_t epoch0,
                      int insert);
/* Server: invalidate the key's entry. 1 if it was valid, 0 if absent. */
int vrpc_meta_invalidate(struct vrpc_meta *m, uint32_t ns, uint16_t vol, uint64_t ino);
/* Server: invalidate every entry at once (bump table_epoch). */
void vrpc_meta_bump(struct vrpc_meta *m);
/* Either end: copy the key's fresh fattr3 into out (84 bytes): its bucket index, or -ENOENT
 * (absent, invalid, older than the store or table epoch, an external writer in progress, or
 * torn by a concurrent rewrite three times). With mac non-NULL (server), the private MAC of
 * the bucket must equal mac too. */
int vrpc_meta_lookup(const struct vrpc_meta *m, uint32_t ns, uint16_t vol, uint64_t ino,
                     uint8_t *out, const uint8_t *mac);
/* Store epoch file (section 7.5). stable: 0 and *begun when no external writer is in progress,
 * -EBUSY otherwise. begin: after taking LMDB's writer lock, the new begun. end: after commit or
 * abort, ended = max(ended, begun). repair: the server, holding the writer lock, ended = begun
 * (a writer died in between). */
int vrpc_epoch_stable(const void *epoch, uint64_t *begun);
uint64_t vrpc_epoch_begin(void *epoch);
void vrpc_epoch_end(void *epoch, uint64_t begun);
void vrpc_epoch_repair(void *epoch);
/* The C fast path (section 5.3; vrpc_fast.c). Counters are server-private. */
struct vrpc_fast_stats {
    uint64_t drained;              /* SQEs consumed by vrpc_srv_drain_fast */
    uint64_t getattr;              /* GETATTR answered in C */
    uint64_t null;                 /* NULL answered in C */
    uint64_t ns;                   /* nanoseconds spent answering them */
};
/* Answer one CALL record (already copied out of the ring) into out (>= 112 bytes) when every
 * check holds: NFSv3 GETATTR whose handle has a fresh entry in the VM table m with the same
 * private MAC, or NFSv3 NULL; AUTH_NONE (empty) or a well-formed AUTH_SYS
 * credential, an empty AUTH_NONE verifier, exact arguments. The reply length, or 0 to
 * decline (Python answers). m may be NULL (NULL only). */
int vrpc_fast_answer(const struct vrpc_meta *m, const uint8_t *rec, uint32_t len, uint8_t *out);
/* vrpc_srv_drain, then answer what vrpc_fast_answer can in C (completing those slots with
 * VRPC_CQE_FAST) and keep the rest in work[] for Python: that count, or what vrpc_srv_drain
 * returned when negative. st->drained says how many SQEs were consumed in all. */
int vrpc_srv_drain_fast(struct vrpc_srv *srv, const struct vrpc_meta *m, struct vrpc_work *work,
                        uint32_t max, struct vrpc_fast_stats *st);
/* One turn of a channel's pump in one crossing from Python (design 5.1): consume the kick
 * eventfd (kick_fd >= 0; EAGAIN is fine), clear SERVER_IDLE, then drain (vrpc_srv_drain_fast
 * when fast, else vrpc_srv_drain) until records for Python are found, `max` SQEs were consumed
 * or the ring is armed with nothing left (R4: arm, recheck, drain again if work slipped in).
 * Returns the count left in work[] for Python (or a negative errno as vrpc_srv_drain); *state
 * says what follows: VRPC_PUMP_MORE (call again: Python records first, or the batch is spent),
 * VRPC_PUMP_ARMED (asleep: the client kicks when it submits). st->drained counts every SQE. */
int vrpc_srv_pump(struct vrpc_srv *srv, const struct vrpc_meta *m, int fast, int kick_fd,
                  struct vrpc_work *work, uint32_t max, struct vrpc_fast_stats *st,
                  uint32_t *state);
/* CDEF-END */

#endif

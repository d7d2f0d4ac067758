/* The VRPC attribute table (one per VM) and the store epoch file: the server's writer (init,
 * publish, invalidate, bump), either end's reader (lookup) and the epoch words (section 7 of the
 * design; native/README.md "Attribute table").
 *
 * Invariants this file protects:
 * - One writer: the server's event-loop thread. The table is mapped read-only by every client
 *   (F_SEAL_FUTURE_WRITE), so the words the server reads back are its own.
 * - Seqlock per entry. Writer: seq = s + 1 (odd), release fence, every other word stored whole
 *   (relaxed), seq = s + 2 (store-release). Reader: seq load-acquire (odd: retry), every word
 *   loaded whole (relaxed) into a private copy, acquire fence, seq reloaded: unchanged or retry.
 *   Nothing from the copy is used before that check.
 * - A hit is fresh (7.5): begun == ended (no external writer in progress) before the entry is
 *   read, the entry is stamped with that begun (low 32 bits) and with the live table_epoch, and
 *   after an acquire fence begun and table_epoch are still what they were.
 * - The server never publishes under an unstable or changed store epoch (-ESTALE).
 * - Zeroed entries carry table_epoch 0 and the table starts at table_epoch 1: never a hit.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stddef.h>
#include <string.h>

#include "vrpc.h"

#define ENTRY_WORDS (VRPC_ATTR_ENTRY_SIZE / 4)

static inline int is_pow2(uint32_t x) { return x != 0 && (x & (x - 1)) == 0; }

static inline uint64_t mix64(uint64_t x)
{
    x ^= x >> 30;
    x *= 0xbf58476d1ce4e5b9ULL;
    x ^= x >> 27;
    x *= 0x94d049bb133111ebULL;
    x ^= x >> 31;
    return x;
}

uint64_t vrpc_meta_size(uint32_t buckets)
{
    if (!is_pow2(buckets) || buckets < VRPC_META_MIN_BUCKETS || buckets > VRPC_META_MAX_BUCKETS)
        return 0;
    return VRPC_META_HEADER_SIZE + (uint64_t)buckets * VRPC_ATTR_ENTRY_SIZE;
}

uint32_t vrpc_meta_bucket(uint32_t buckets, uint32_t ns, uint16_t vol, uint64_t ino)
{
    uint64_t h = mix64(ino ^ mix64(((uint64_t)ns << 16) | vol));
    return (uint32_t)h & (buckets - 1) & ~1u;
}

int vrpc_meta_init(struct vrpc_meta *m, void *base, uint64_t size, uint32_t buckets,
                   uint32_t vm_ns, uint64_t boot_id, void *epoch, uint8_t *macs)
{
    uint64_t need = vrpc_meta_size(buckets);
    if (!need || size < need || !base)
        return -EINVAL;
    struct vrpc_meta_header *hdr = base;
    memset(m, 0, sizeof *m);
    m->hdr = hdr;
    m->attrs = (struct vrpc_attr_entry *)((uint8_t *)base + VRPC_META_HEADER_SIZE);
    m->epoch = epoch;
    m->macs = macs;
    m->size = size;
    m->buckets = buckets;
    m->vm_ns = vm_ns;
    m->table_epoch = 1;
    hdr->abi_major = VRPC_ABI_MAJOR;
    hdr->abi_minor = VRPC_ABI_MINOR;
    hdr->header_size = VRPC_META_HEADER_SIZE;
    hdr->attr_offset = VRPC_META_HEADER_SIZE;
    hdr->attr_buckets = buckets;
    hdr->dent_offset = 0;
    hdr->dent_buckets = 0;
    hdr->vm_ns = vm_ns;
    hdr->boot_id = boot_id;
    __atomic_store_n(&hdr->table_epoch, 1u, __ATOMIC_RELAXED);
    __atomic_store_n(&hdr->magic, (uint64_t)VRPC_META_MAGIC, __ATOMIC_RELEASE);
    return 0;
}

int vrpc_meta_open(struct vrpc_meta *m, const void *base, uint64_t mapped_size,
                   const void *epoch, uint64_t epoch_size)
{
    const struct vrpc_meta_header *hdr = base;
    if (!base || mapped_size < VRPC_META_HEADER_SIZE)
        return -EINVAL;
    if (__atomic_load_n(&hdr->magic, __ATOMIC_ACQUIRE) != (uint64_t)VRPC_META_MAGIC)
        return -EBADMSG;
    if (hdr->abi_major != VRPC_ABI_MAJOR)
        return -EPROTONOSUPPORT;
    uint32_t buckets = hdr->attr_buckets;
    uint64_t need = vrpc_meta_size(buckets);
    if (hdr->header_size != VRPC_META_HEADER_SIZE || hdr->attr_offset != VRPC_META_HEADER_SIZE ||
        !need || mapped_size < need)
        return -EINVAL;
    if (epoch) {
        const struct vrpc_epoch_file *ep = epoch;
        if (epoch_size < VRPC_EPOCH_SIZE)
            return -EINVAL;
        if (__atomic_load_n(&ep->magic, __ATOMIC_ACQUIRE) != (uint64_t)VRPC_EPOCH_MAGIC)
            return -EBADMSG;
    }
    memset(m, 0, sizeof *m);
    m->hdr = (struct vrpc_meta_header *)base;
    m->attrs = (struct vrpc_attr_entry *)((uint8_t *)base + VRPC_META_HEADER_SIZE);
    m->epoch = (struct vrpc_epoch_file *)epoch;
    m->size = mapped_size;
    m->buckets = buckets;
    m->vm_ns = hdr->vm_ns;
    return 0;
}

/* Server only: the entry's key and validity, read from its own (single-writer) words. */
static int holds(const struct vrpc_meta *m, const struct vrpc_attr_entry *e, uint32_t ns,
                 uint16_t vol, uint64_t ino)
{
    return (e->flags & VRPC_ATTR_VALID) && e->table_epoch == m->table_epoch && e->ns == ns &&
           e->vol == vol && e->ino == ino;
}

static int find(const struct vrpc_meta *m, uint32_t ns, uint16_t vol, uint64_t ino)
{
    uint32_t b = vrpc_meta_bucket(m->buckets, ns, vol, ino);
    for (uint32_t i = 0; i < 2; i++)
        if (holds(m, &m->attrs[b ^ i], ns, vol, ino))
            return (int)(b ^ i);
    return -ENOENT;
}

/* Seqlock write of a private copy into the shared entry (all words but seq, then seq). */
static void write_entry(struct vrpc_attr_entry *e, const struct vrpc_attr_entry *src)
{
    uint32_t *dst = (uint32_t *)e;
    const uint32_t *from = (const uint32_t *)src;
    uint32_t s = dst[0];
    __atomic_store_n(&dst[0], s + 1, __ATOMIC_RELAXED);
    __atomic_thread_fence(__ATOMIC_RELEASE);
    for (int i = 1; i < ENTRY_WORDS; i++)
        __atomic_store_n(&dst[i], from[i], __ATOMIC_RELAXED);
    __atomic_store_n(&dst[0], s + 2, __ATOMIC_RELEASE);
}

int vrpc_meta_publish(struct vrpc_meta *m, uint32_t ns, uint16_t vol, uint64_t ino,
                      const uint8_t *fattr3, uint32_t flags, const uint8_t *mac, uint64_t epoch0,
                      int insert)
{
    if (m->epoch) {
        uint64_t now;
        if (vrpc_epoch_stable(m->epoch, &now) < 0 || now != epoch0)
            return -ESTALE;
    }
    int idx = find(m, ns, vol, ino);
    if (idx < 0) {
        if (!insert)
            return -ENOENT;
        uint32_t b = vrpc_meta_bucket(m->buckets, ns, vol, ino);
        const struct vrpc_attr_entry *e0 = &m->attrs[b], *e1 = &m->attrs[b ^ 1];
        int live0 = (e0->flags & VRPC_ATTR_VALID) && e0->table_epoch == m->table_epoch;
        int live1 = (e1->flags & VRPC_ATTR_VALID) && e1->table_epoch == m->table_epoch;
        if (!live0)
            idx = (int)b;
        else if (!live1)
            idx = (int)(b ^ 1);
        else
            idx = (int)(e0->gen <= e1->gen ? b : b ^ 1);
    }
    struct vrpc_attr_entry next;
    memset(&next, 0, sizeof next);
    next.store_epoch = (uint32_t)epoch0;
    next.table_epoch = m->table_epoch;
    next.flags = flags | VRPC_ATTR_VALID;
    next.ns = ns;
    next.vol = vol;
    next.ino = ino;
    next.gen = ++m->gen;
    memcpy(next.fattr3, fattr3, VRPC_FATTR3_SIZE);
    write_entry(&m->attrs[idx], &next);
    if (m->macs) {
        if (mac)
            memcpy(m->macs + (size_t)idx * VRPC_MAC_SIZE, mac, VRPC_MAC_SIZE);
        else
            memset(m->macs + (size_t)idx * VRPC_MAC_SIZE, 0, VRPC_MAC_SIZE);
    }
    return idx;
}

int vrpc_meta_invalidate(struct vrpc_meta *m, uint32_t ns, uint16_t vol, uint64_t ino)
{
    int idx = find(m, ns, vol, ino);
    if (idx < 0)
        return 0;
    struct vrpc_attr_entry next;
    memcpy(&next, &m->attrs[idx], sizeof next);
    next.flags = 0;
    write_entry(&m->attrs[idx], &next);
    return 1;
}

void vrpc_meta_bump(struct vrpc_meta *m)
{
    m->table_epoch += 1;
    if (m->table_epoch == 0) /* 0 is what zeroed entries carry */
        m->table_epoch = 1;
    __atomic_store_n(&m->hdr->table_epoch, m->table_epoch, __ATOMIC_SEQ_CST);
}

int vrpc_meta_lookup(const struct vrpc_meta *m, uint32_t ns, uint16_t vol, uint64_t ino,
                     uint8_t *out, const uint8_t *mac)
{
    uint64_t begun = 0;
    if (m->epoch && vrpc_epoch_stable(m->epoch, &begun) < 0)
        return -ENOENT;
    uint32_t te = __atomic_load_n(&m->hdr->table_epoch, __ATOMIC_ACQUIRE);
    uint32_t b = vrpc_meta_bucket(m->buckets, ns, vol, ino);
    for (uint32_t i = 0; i < 2; i++) {
        const uint32_t *words = (const uint32_t *)&m->attrs[b ^ i];
        struct vrpc_attr_entry copy;
        uint32_t *to = (uint32_t *)&copy;
        memset(&copy, 0, sizeof copy);
        int stable = 0;
        for (int tries = 0; tries < 3 && !stable; tries++) {
            uint32_t s1 = __atomic_load_n(&words[0], __ATOMIC_ACQUIRE);
            if (s1 & 1)
                continue;
            for (int w = 1; w < ENTRY_WORDS; w++)
                to[w] = __atomic_load_n(&words[w], __ATOMIC_RELAXED);
            __atomic_thread_fence(__ATOMIC_ACQUIRE);
            stable = __atomic_load_n(&words[0], __ATOMIC_RELAXED) == s1;
        }
        if (!stable)
            return -ENOENT; /* being rewritten: the RPC path answers */
        if (!(copy.flags & VRPC_ATTR_VALID) || copy.ns != ns || copy.vol != vol ||
            copy.ino != ino)
            continue;
        if (copy.store_epoch != (uint32_t)begun || copy.table_epoch != te)
            return -ENOENT;
        if (mac && (!m->macs ||
                    memcmp(m->macs + (size_t)(b ^ i) * VRPC_MAC_SIZE, mac, VRPC_MAC_SIZE) != 0))
            return -ENOENT;
        __atomic_thread_fence(__ATOMIC_ACQUIRE);
        if (m->epoch && __atomic_load_n(&m->epoch->begun, __ATOMIC_RELAXED) != begun)
            return -ENOENT;
        if (__atomic_load_n(&m->hdr->table_epoch, __ATOMIC_RELAXED) != te)
            return -ENOENT;
        memcpy(out, copy.fattr3, VRPC_FATTR3_SIZE);
        return (int)(b ^ i);
    }
    return -ENOENT;
}

int vrpc_epoch_stable(const void *epoch, uint64_t *begun)
{
    const struct vrpc_epoch_file *ep = epoch;
    uint64_t b = __atomic_load_n(&ep->begun, __ATOMIC_ACQUIRE);
    if (__atomic_load_n(&ep->ended, __ATOMIC_ACQUIRE) != b)
        return -EBUSY;
    *begun = b;
    return 0;
}

uint64_t vrpc_epoch_begin(void *epoch)
{
    struct vrpc_epoch_file *ep = epoch;
    return __atomic_add_fetch(&ep->begun, 1, __ATOMIC_SEQ_CST);
}

void vrpc_epoch_end(void *epoch, uint64_t begun)
{
    struct vrpc_epoch_file *ep = epoch;
    uint64_t cur = __atomic_load_n(&ep->ended, __ATOMIC_RELAXED);
    while (cur < begun &&
           !__atomic_compare_exchange_n(&ep->ended, &cur, begun, 1, __ATOMIC_SEQ_CST,
                                        __ATOMIC_RELAXED))
        ;
}

void vrpc_epoch_repair(void *epoch)
{
    struct vrpc_epoch_file *ep = epoch;
    __atomic_store_n(&ep->ended, __atomic_load_n(&ep->begun, __ATOMIC_SEQ_CST), __ATOMIC_SEQ_CST);
}

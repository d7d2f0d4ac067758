/* Compile-time pins of the VRPC ABI (native/vrpc.h): offsets and sizes a peer relies on. A change
 * here is an ABI change: bump VRPC_ABI_MAJOR (incompatible) or VRPC_ABI_MINOR (compatible), and
 * update vrpc/abi.py and native/README.md with it. */
#include <stddef.h>

#include "vrpc.h"

#define PIN(type, field, off) _Static_assert(offsetof(type, field) == (off), #type "." #field)

_Static_assert(sizeof(struct vrpc_ring_header) == VRPC_HEADER_SIZE, "ring header size");
PIN(struct vrpc_ring_header, magic, 0);
PIN(struct vrpc_ring_header, abi_major, 8);
PIN(struct vrpc_ring_header, abi_minor, 10);
PIN(struct vrpc_ring_header, header_size, 12);
PIN(struct vrpc_ring_header, segment_size, 16);
PIN(struct vrpc_ring_header, boot_id, 24);
PIN(struct vrpc_ring_header, channel_id, 32);
PIN(struct vrpc_ring_header, sq_offset, 40);
PIN(struct vrpc_ring_header, cq_offset, 44);
PIN(struct vrpc_ring_header, entries, 48);
PIN(struct vrpc_ring_header, nslots, 52);
PIN(struct vrpc_ring_header, slot_offset, 56);
PIN(struct vrpc_ring_header, slot_size, 60);
PIN(struct vrpc_ring_header, doorbell, 64);
PIN(struct vrpc_ring_header, features, 68);
PIN(struct vrpc_ring_header, sq_tail, 128);
PIN(struct vrpc_ring_header, client_flags, 132);
PIN(struct vrpc_ring_header, sq_head, 192);
PIN(struct vrpc_ring_header, server_flags, 196);
PIN(struct vrpc_ring_header, cq_tail, 256);
PIN(struct vrpc_ring_header, cq_head, 320);

_Static_assert(sizeof(struct vrpc_sqe) == 16, "sqe size");
_Static_assert(sizeof(struct vrpc_cqe) == 16, "cqe size");
PIN(struct vrpc_sqe, slot, 0);
PIN(struct vrpc_sqe, len, 4);
PIN(struct vrpc_sqe, flags, 8);
PIN(struct vrpc_cqe, slot, 0);
PIN(struct vrpc_cqe, len, 4);
PIN(struct vrpc_cqe, flags, 8);
_Static_assert(2 * 16 * VRPC_MAX_ENTRIES <= VRPC_HEADER_SIZE, "SQ and CQ fit one page");
_Static_assert(VRPC_SLOT_SIZE % 4096 == 0, "slots are page-aligned");

_Static_assert(sizeof(struct vrpc_meta_header) == 4096, "meta header size");
PIN(struct vrpc_meta_header, magic, 0);
PIN(struct vrpc_meta_header, abi_major, 8);
PIN(struct vrpc_meta_header, abi_minor, 10);
PIN(struct vrpc_meta_header, header_size, 12);
PIN(struct vrpc_meta_header, attr_offset, 16);
PIN(struct vrpc_meta_header, attr_buckets, 20);
PIN(struct vrpc_meta_header, dent_offset, 24);
PIN(struct vrpc_meta_header, dent_buckets, 28);
PIN(struct vrpc_meta_header, vm_ns, 32);
PIN(struct vrpc_meta_header, boot_id, 40);
PIN(struct vrpc_meta_header, table_epoch, 128);

_Static_assert(sizeof(struct vrpc_attr_entry) == 128, "attr entry size");
PIN(struct vrpc_attr_entry, seq, 0);
PIN(struct vrpc_attr_entry, store_epoch, 4);
PIN(struct vrpc_attr_entry, table_epoch, 8);
PIN(struct vrpc_attr_entry, flags, 12);
PIN(struct vrpc_attr_entry, ns, 16);
PIN(struct vrpc_attr_entry, vol, 20);
PIN(struct vrpc_attr_entry, ino, 24);
PIN(struct vrpc_attr_entry, gen, 32);
PIN(struct vrpc_attr_entry, fattr3, 40);

_Static_assert(sizeof(struct vrpc_epoch_file) == 4096, "epoch file size");
PIN(struct vrpc_epoch_file, magic, 0);
PIN(struct vrpc_epoch_file, begun, 64);
PIN(struct vrpc_epoch_file, ended, 128);

_Static_assert(VRPC_FATTR3_SIZE + 40 <= VRPC_ATTR_ENTRY_SIZE, "fattr3 fits its entry");
_Static_assert(VRPC_ATTR_ENTRY_SIZE % 4 == 0, "entries are whole u32 words");
_Static_assert(sizeof(struct vrpc_meta_header) == VRPC_META_HEADER_SIZE, "meta header constant");
_Static_assert(sizeof(struct vrpc_epoch_file) == VRPC_EPOCH_SIZE, "epoch file constant");

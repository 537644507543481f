/* SPSC ring of variable-length records in shared memory (a memfd mapped by the daemon
 * and one app). The other side is untrusted: every index and length read from shared
 * memory is validated before use, and the consumer never reads outside the data area.
 *
 * Region layout (offsets from the ring base, which must be 64-byte aligned):
 *     0   u64 head               written by the producer only (own cache line)
 *    64   u64 tail               written by the consumer only (own cache line)
 *   128   u32 consumer_sleeping  set by the consumer before it sleeps on "empty"
 *   132   u32 producer_waiting   set by the producer before it sleeps on "full"
 *   136   u64 capacity           size of the data area, a power of two
 *   192   data area (capacity bytes)
 *
 * head and tail are free-running byte positions (offset = pos & (capacity - 1)), always
 * multiples of 8. A record: u32 length, u32 reserved (0), length bytes, padded to 8.
 * A record that does not fit before the end of the data area is preceded by a wrap
 * marker (length RING_WRAP) and starts at offset 0.
 */
#ifndef MRPCD_RING_H
#define MRPCD_RING_H

#include <stdint.h>

#define RING_CTRL_SIZE 192
#define RING_REC_HDR 8
#define RING_WRAP 0xFFFFFFFFu
#define RING_MIN_CAPACITY 64
#define RING_MAX_CAPACITY 0x80000000ull

/* return codes (negative) */
#define RING_E_FULL (-1)    /* no room now: retry after the consumer frees space */
#define RING_E_TOOBIG (-2)  /* record larger than the ring can ever hold / caller buffer */
#define RING_E_CORRUPT (-3) /* shared state broken by the other side; sticky */
#define RING_E_INVAL (-4)   /* bad arguments (capacity not a power of two, ...) */

struct ring_ctrl {
    uint64_t head;
    uint8_t pad0[56];
    uint64_t tail;
    uint8_t pad1[56];
    uint32_t consumer_sleeping;
    uint32_t producer_waiting;
    uint64_t capacity;
    uint8_t pad2[48];
};

/* A process-local view of one ring. Its fields are trusted (private memory); shared
 * memory is only read through it with validation. One view per side. */
typedef struct ring {
    struct ring_ctrl *ctrl;
    uint8_t *data;
    uint64_t cap;
    uint64_t mask;
    uint64_t head;       /* producer: next write position (the truth, not re-read) */
    uint64_t tail_cache; /* producer: last tail seen from the consumer */
    uint64_t tail;       /* consumer: next read position (the truth, not re-read) */
    uint64_t pending;    /* consumer: bytes covered by the last ring_peek */
    uint64_t taken;      /* consumer: bytes covered by the last ring_take_batch (unreleased) */
    uint64_t reserved;   /* producer: head before an open ring_reserve (0 = none open) */
    int has_reservation; /* producer: a ring_reserve is open; pushes report FULL until commit */
    int corrupt;         /* sticky: once the shared state was found broken */
} ring_t;

/* Set up a fresh ring at base (zeroes the control block). */
int ring_init(ring_t *r, void *base, uint64_t capacity);
/* Attach to a ring another process initialised; validates capacity and indices. */
int ring_attach(ring_t *r, void *base, uint64_t capacity);

/* producer */
int ring_try_push(ring_t *r, const void *buf, uint32_t len);
int ring_push_many(ring_t *r, const void *const *bufs, const uint32_t *lens, uint32_t n);
int ring_push_packed(ring_t *r, const void *base, const uint32_t *lens, uint32_t n);
/* Gather push: record i is the concatenation of nsegs[i] consecutive entries of segs
 * (zero-copy sources: e.g. a patched header + a view of the received body). */
struct ring_seg {
    const void *p;
    uint32_t len;
};
int ring_push_segs(ring_t *r, const struct ring_seg *segs, const uint32_t *nsegs, uint32_t n);
/* Zero-copy receive: reserve room for one record of len bytes and get where its bytes go
 * (*data, len bytes, contiguous). Nothing is visible to the consumer until ring_commit;
 * while a reservation is open every push reports RING_E_FULL (order is kept: the
 * reserved record was first). ring_unreserve drops it (e.g. the sender died mid-record).
 * Returns 0, RING_E_FULL (no room now; nothing reserved), RING_E_TOOBIG, RING_E_CORRUPT,
 * or RING_E_INVAL if a reservation is already open. */
int ring_reserve(ring_t *r, uint32_t len, uint8_t **data);
void ring_commit(ring_t *r);
void ring_unreserve(ring_t *r);
int ring_producer_prepare_wait(ring_t *r, uint32_t len);
void ring_producer_finish_wait(ring_t *r);
int ring_producer_should_wake(ring_t *r);

/* consumer */
int ring_peek(ring_t *r, const uint8_t **data, uint32_t *len);
void ring_pop(ring_t *r);
int ring_pop_batch(ring_t *r, void *out, uint64_t out_size, uint32_t *lens,
                   uint32_t max_records);
/* Like ring_pop_batch, except that a record of at least big_min bytes is not copied:
 * ptrs[i] points at it in the ring (NULL for copied records) and nothing is released
 * until ring_release(r), so the caller may read or send the big records in place (the
 * producer can still scribble on them: copy whatever is inspected). out_size bounds the
 * copied bytes and, separately, the bytes left in place (a first record always goes).
 * A later take, pop or peek releases an open take first. */
int ring_take_batch(ring_t *r, void *out, uint64_t out_size, uint32_t *lens,
                    const uint8_t **ptrs, uint32_t max_records, uint32_t big_min);
void ring_release(ring_t *r);
/* A take that does not end the open one: it continues after everything taken so far and
 * adds to it; *extent is the ring bytes this call covered (records and wrap markers).
 * Extents are released in order, oldest first, with ring_release_bytes: a sender that
 * lends several batches to sockets frees each as soon as it and all older ones are sent. */
int ring_take_more(ring_t *r, void *out, uint64_t out_size, uint32_t *lens,
                   const uint8_t **ptrs, uint32_t max_records, uint32_t big_min, uint64_t *extent);
int ring_release_bytes(ring_t *r, uint64_t nbytes);
/* Give back the newest nbytes taken (the extent of the last ring_take_more) without freeing
 * them: the next take returns those records again. For a caller that could not keep what it
 * took (out of memory building its records): nothing is lost and no ring space leaks. */
int ring_untake(ring_t *r, uint64_t nbytes);
int ring_consumer_prepare_sleep(ring_t *r);
void ring_consumer_finish_sleep(ring_t *r);
int ring_consumer_has_data(ring_t *r);
int ring_consumer_should_wake_producer(ring_t *r);

/* either side (advisory snapshots) */
uint64_t ring_used_bytes(const ring_t *r);
int ring_is_empty(const ring_t *r);

#endif

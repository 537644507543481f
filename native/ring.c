/* SPSC ring of variable-length records in shared memory. See ring.h for the layout and
 * native/ring.py for the wake-up protocol.
 *
 * Trust: the ring lives in memory the other process can write at any moment. This side
 * keeps its own position (head for the producer, tail for the consumer) and the capacity
 * in its private ring_t, reads the other side's index once per operation with acquire
 * ordering, and checks it against capacity before using it. Every record length is read
 * once into a local and checked against the data area and the published bytes, so no
 * value from shared memory can make us read or write outside the mapping.
 */
#include "ring.h"

#include <string.h>

#define LOAD_ACQ(p) __atomic_load_n((p), __ATOMIC_ACQUIRE)
#define LOAD_RLX(p) __atomic_load_n((p), __ATOMIC_RELAXED)
#define STORE_REL(p, v) __atomic_store_n((p), (v), __ATOMIC_RELEASE)
#define STORE_RLX(p, v) __atomic_store_n((p), (v), __ATOMIC_RELAXED)
#define FENCE() __atomic_thread_fence(__ATOMIC_SEQ_CST)

_Static_assert(sizeof(struct ring_ctrl) == RING_CTRL_SIZE, "control block size");

static inline uint64_t align8(uint64_t n) { return (n + 7) & ~(uint64_t)7; }

static int valid_capacity(uint64_t cap)
{
    return cap >= RING_MIN_CAPACITY && cap <= RING_MAX_CAPACITY && (cap & (cap - 1)) == 0;
}

static int set_corrupt(ring_t *r)
{
    r->corrupt = 1;
    return RING_E_CORRUPT;
}

static void view(ring_t *r, void *base, uint64_t cap)
{
    memset(r, 0, sizeof(*r));
    r->ctrl = (struct ring_ctrl *)base;
    r->data = (uint8_t *)base + RING_CTRL_SIZE;
    r->cap = cap;
    r->mask = cap - 1;
}

int ring_init(ring_t *r, void *base, uint64_t capacity)
{
    if (!valid_capacity(capacity) || ((uintptr_t)base & 63))
        return RING_E_INVAL;
    view(r, base, capacity);
    memset(base, 0, RING_CTRL_SIZE);
    r->ctrl->capacity = capacity;
    FENCE();
    return 0;
}

int ring_attach(ring_t *r, void *base, uint64_t capacity)
{
    if (!valid_capacity(capacity) || ((uintptr_t)base & 63))
        return RING_E_INVAL;
    view(r, base, capacity);
    struct ring_ctrl *c = r->ctrl;
    uint64_t head = LOAD_ACQ(&c->head), tail = LOAD_ACQ(&c->tail);
    if (LOAD_RLX(&c->capacity) != capacity || ((head | tail) & 7) || head - tail > capacity)
        return set_corrupt(r);
    r->head = head;
    r->tail_cache = tail;
    r->tail = tail;
    return 0;
}

/* ---------------------------------------------------------------- producer */

/* Re-read the consumer's tail. Valid iff it moved forward, not past our head. */
static int refresh_tail(ring_t *r)
{
    uint64_t t = LOAD_ACQ(&r->ctrl->tail);
    if ((t & 7) || t - r->tail_cache > r->head - r->tail_cache)
        return set_corrupt(r);
    r->tail_cache = t;
    return 0;
}

/* Bytes a record of len needs at the current head: the wrap filler (if any) + record. */
static inline void space_needed(const ring_t *r, uint32_t len, uint64_t *wrap, uint64_t *need)
{
    uint64_t off = r->head & r->mask;
    *need = RING_REC_HDR + align8(len);
    *wrap = off + *need > r->cap ? r->cap - off : 0;
}

/* Would a push of len make progress (write the record, or at least the wrap marker)? */
static inline int can_progress(const ring_t *r, uint64_t wrap, uint64_t need)
{
    uint64_t free_ = r->cap - (r->head - r->tail_cache);
    return free_ >= wrap + need || (wrap && free_ >= wrap);
}

static inline void put_wrap(ring_t *r, uint64_t wrap)
{
    STORE_RLX((uint32_t *)(r->data + (r->head & r->mask)), RING_WRAP);
    r->head += wrap;
}

/* Room for one record of len bytes at head: the wrap marker first if one is needed (also
 * when the record itself does not fit yet: otherwise a record longer than the bytes left
 * before the end could never go in, even into an empty ring), then the record's length
 * header. Sets *data to where its bytes go and advances head, without publishing it. */
static int claim(ring_t *r, uint64_t len, uint8_t **data)
{
    if (r->has_reservation)
        return RING_E_FULL; /* the reserved record goes first: nothing may pass it */
    if (len > r->cap - RING_REC_HDR)
        return RING_E_TOOBIG;
    uint64_t wrap, need;
    space_needed(r, (uint32_t)len, &wrap, &need);
    if (r->cap - (r->head - r->tail_cache) < wrap + need) {
        if (refresh_tail(r))
            return RING_E_CORRUPT;
        uint64_t free_ = r->cap - (r->head - r->tail_cache);
        if (free_ < wrap + need) {
            if (wrap && free_ >= wrap)
                put_wrap(r, wrap);
            return RING_E_FULL;
        }
    }
    if (wrap)
        put_wrap(r, wrap);
    uint8_t *p = r->data + (r->head & r->mask);
    uint32_t hdr[2] = {(uint32_t)len, 0};
    memcpy(p, hdr, sizeof(hdr));
    r->head += need;
    *data = p + RING_REC_HDR;
    return 0;
}

/* Write one record without publishing head. */
static int push_one(ring_t *r, const void *buf, uint32_t len)
{
    uint8_t *p;
    int rc = claim(r, len, &p);
    if (rc == 0 && len)
        memcpy(p, buf, len);
    return rc;
}

static inline void publish(ring_t *r) { STORE_REL(&r->ctrl->head, r->head); }

int ring_try_push(ring_t *r, const void *buf, uint32_t len)
{
    if (r->corrupt)
        return RING_E_CORRUPT;
    uint64_t before = r->head;
    int rc = push_one(r, buf, len);
    if (r->head != before)
        publish(r);
    return rc;
}

/* Push records until one does not fit; publish head once. Returns how many were pushed,
 * or a negative code if none was and the first failed for a reason other than "full". */
int ring_push_many(ring_t *r, const void *const *bufs, const uint32_t *lens, uint32_t n)
{
    if (r->corrupt)
        return RING_E_CORRUPT;
    uint64_t before = r->head;
    uint32_t i;
    int rc = 0;
    for (i = 0; i < n; i++)
        if ((rc = push_one(r, bufs[i], lens[i])) != 0)
            break;
    if (r->head != before)
        publish(r);
    return (i == 0 && rc != 0 && rc != RING_E_FULL) ? rc : (int)i;
}

/* Same, with the records laid end to end in one buffer (one join on the Python side). */
int ring_push_packed(ring_t *r, const void *base, const uint32_t *lens, uint32_t n)
{
    if (r->corrupt)
        return RING_E_CORRUPT;
    const uint8_t *p = base;
    uint64_t before = r->head;
    uint32_t i;
    int rc = 0;
    for (i = 0; i < n; i++) {
        if ((rc = push_one(r, p, lens[i])) != 0)
            break;
        p += lens[i];
    }
    if (r->head != before)
        publish(r);
    return (i == 0 && rc != 0 && rc != RING_E_FULL) ? rc : (int)i;
}

/* Write one record made of k segments (total len, already summed) without publishing. */
static int push_one_segs(ring_t *r, const struct ring_seg *segs, uint32_t k, uint64_t len)
{
    uint8_t *p;
    int rc = claim(r, len, &p);
    if (rc)
        return rc;
    for (uint32_t j = 0; j < k; j++) {
        if (segs[j].len)
            memcpy(p, segs[j].p, segs[j].len);
        p += segs[j].len;
    }
    return 0;
}

/* Push records given as segment lists until one does not fit; publish head once.
 * Same return convention as ring_push_many. */
int ring_push_segs(ring_t *r, const struct ring_seg *segs, const uint32_t *nsegs, uint32_t n)
{
    if (r->corrupt)
        return RING_E_CORRUPT;
    uint64_t before = r->head;
    uint32_t i;
    int rc = 0;
    for (i = 0; i < n; i++) {
        uint64_t len = 0;
        for (uint32_t j = 0; j < nsegs[i]; j++)
            len += segs[j].len;
        if (len > 0xFFFFFFFFull) {
            rc = RING_E_TOOBIG;
            break;
        }
        if ((rc = push_one_segs(r, segs, nsegs[i], len)) != 0)
            break;
        segs += nsegs[i];
    }
    if (r->head != before)
        publish(r);
    return (i == 0 && rc != 0 && rc != RING_E_FULL) ? rc : (int)i;
}

int ring_reserve(ring_t *r, uint32_t len, uint8_t **data)
{
    if (r->corrupt)
        return RING_E_CORRUPT;
    if (r->has_reservation)
        return RING_E_INVAL;
    uint64_t before = r->head;
    int rc = claim(r, len, data);
    if (rc) {
        if (r->head != before)
            publish(r); /* a lone wrap marker is harmless to publish (the consumer skips it) */
        return rc;
    }
    r->reserved = r->head - (RING_REC_HDR + align8(len));
    if (r->reserved != before)
        STORE_REL(&r->ctrl->head, r->reserved); /* the wrap marker only, not the record */
    r->has_reservation = 1;
    return 0;
}

void ring_commit(ring_t *r)
{
    if (!r->has_reservation)
        return;
    r->has_reservation = 0;
    publish(r);
}

void ring_unreserve(ring_t *r)
{
    if (!r->has_reservation)
        return;
    r->has_reservation = 0;
    r->head = r->reserved;
}

/* After a push returned FULL. Raises producer_waiting, then re-checks the tail: 1 = the
 * record still cannot make progress, the caller may sleep (the consumer will see the flag
 * after its next pop); 0 = there is room now, push again; <0 = corrupt. */
int ring_producer_prepare_wait(ring_t *r, uint32_t len)
{
    if (r->corrupt)
        return RING_E_CORRUPT;
    STORE_RLX(&r->ctrl->producer_waiting, 1);
    if (r->has_reservation)
        return 1; /* pushes fail until it ends, room or not: "push again" would spin */
    FENCE(); /* flag store before tail load; pairs with the consumer's fence */
    if (refresh_tail(r))
        return RING_E_CORRUPT;
    uint64_t wrap, need;
    space_needed(r, len, &wrap, &need);
    if (can_progress(r, wrap, need)) {
        STORE_RLX(&r->ctrl->producer_waiting, 0);
        return 0;
    }
    return 1;
}

void ring_producer_finish_wait(ring_t *r) { STORE_RLX(&r->ctrl->producer_waiting, 0); }

/* A sleeper's flag, read after the caller's fence: 1 if it was set and this call is the one
 * that cleared it (so a burst wakes the other side at most once), else 0. The plain load
 * first keeps the common "nobody sleeps" case free of an atomic read-modify-write. */
static int take_flag(uint32_t *flag)
{
    if (!LOAD_RLX(flag))
        return 0;
    return __atomic_exchange_n(flag, 0, __ATOMIC_SEQ_CST) != 0;
}

/* After publishing head: must the consumer be woken? Clears the flag so one burst costs
 * at most one wake-up. */
int ring_producer_should_wake(ring_t *r)
{
    FENCE(); /* head store before flag load; pairs with the consumer's prepare_sleep */
    return take_flag(&r->ctrl->consumer_sleeping);
}

/* ---------------------------------------------------------------- consumer */

/* Load and validate the producer's head against our tail. head only moves forward, so it
 * is never behind what this side has taken (read, not yet freed): a head moved back there
 * would make head - position wrap around and a take read stale memory as records. */
static int load_head(ring_t *r, uint64_t *head)
{
    uint64_t h = LOAD_ACQ(&r->ctrl->head);
    if ((h & 7) || h - r->tail > r->cap || h - r->tail < r->taken)
        return set_corrupt(r);
    *head = h;
    return 0;
}

/* Locate the record at *pos (skipping a wrap marker, which advances *pos). Returns 1 and
 * sets *len / *off (data offset of the header) if there is one, 0 if *pos reached head,
 * RING_E_CORRUPT if what the producer wrote is impossible. */
static int next_record(ring_t *r, uint64_t *pos, uint64_t head, uint32_t *len, uint64_t *off)
{
    for (int round = 0; round < 2; round++) {
        uint64_t used = head - *pos;
        if (used == 0)
            return 0;
        uint64_t o = *pos & r->mask;
        uint32_t l = LOAD_RLX((uint32_t *)(r->data + o)); /* read once: no TOCTOU */
        if (l == RING_WRAP) {
            uint64_t skip = r->cap - o;
            if (o == 0 || skip > used)
                return set_corrupt(r);
            *pos += skip;
            continue;
        }
        uint64_t need = RING_REC_HDR + align8(l);
        if ((uint64_t)l > r->cap - RING_REC_HDR || o + need > r->cap || need > used)
            return set_corrupt(r);
        *len = l;
        *off = o;
        return 1;
    }
    return set_corrupt(r); /* two wrap markers in a row (second one was at offset 0) */
}

static inline void release_tail(ring_t *r, uint64_t pos)
{
    if (pos != r->tail) {
        r->tail = pos;
        STORE_REL(&r->ctrl->tail, pos);
    }
}

/* Zero-copy look at the next record (valid until ring_pop; the producer may still
 * scribble over it, so copy what you inspect). 1 = record, 0 = empty, <0 = corrupt. */
int ring_peek(ring_t *r, const uint8_t **data, uint32_t *len)
{
    ring_release(r);
    r->pending = 0;
    if (r->corrupt)
        return RING_E_CORRUPT;
    uint64_t head, pos = r->tail, off;
    uint32_t l;
    if (load_head(r, &head))
        return RING_E_CORRUPT;
    int rc = next_record(r, &pos, head, &l, &off);
    if (rc <= 0) {
        if (rc == 0)
            release_tail(r, pos); /* a lone wrap marker: free its bytes now */
        return rc;
    }
    *data = r->data + off + RING_REC_HDR;
    *len = l;
    r->pending = pos - r->tail + RING_REC_HDR + align8(l);
    return 1;
}

/* Release what the last ring_take_batch left in place (no-op if nothing is taken). */
void ring_release(ring_t *r)
{
    if (r->taken && !r->corrupt)
        release_tail(r, r->tail + r->taken);
    r->taken = 0;
}

/* Release the record returned by the last ring_peek. */
void ring_pop(ring_t *r)
{
    if (r->pending && !r->corrupt)
        release_tail(r, r->tail + r->pending);
    r->pending = 0;
}

/* Copy up to max_records records end to end into out (at most out_size bytes), their
 * lengths into lens, and release them with one tail store. Returns the count; 0 if the
 * ring is empty; RING_E_TOOBIG if the first record alone exceeds out_size (nothing is
 * consumed); RING_E_CORRUPT if the ring is corrupt and nothing was copied (records
 * before a corrupt one are still returned; the next call reports the corruption). */
int ring_pop_batch(ring_t *r, void *out, uint64_t out_size, uint32_t *lens,
                   uint32_t max_records)
{
    ring_release(r); /* an open take ends first */
    uint64_t extent;
    /* a take that keeps nothing in place (no record is UINT32_MAX bytes), freed at once;
     * a corrupt record stops it before that record */
    int n = ring_take_more(r, out, out_size, lens, NULL, max_records, UINT32_MAX, &extent);
    ring_release(r);
    return n;
}

int ring_take_batch(ring_t *r, void *out, uint64_t out_size, uint32_t *lens,
                    const uint8_t **ptrs, uint32_t max_records, uint32_t big_min)
{
    ring_release(r); /* the previous take is over */
    uint64_t extent;
    int n = ring_take_more(r, out, out_size, lens, ptrs, max_records, big_min, &extent);
    for (int i = 0; i < n; i++)
        if (ptrs[i])
            return n; /* big records stay in place until ring_release */
    ring_release(r);  /* all copied (or a lone wrap marker): free at once, as a pop does */
    return n;
}

int ring_take_more(ring_t *r, void *out, uint64_t out_size, uint32_t *lens,
                   const uint8_t **ptrs, uint32_t max_records, uint32_t big_min, uint64_t *extent)
{
    *extent = 0;
    r->pending = 0;
    if (r->corrupt)
        return RING_E_CORRUPT;
    uint64_t head, start = r->tail + r->taken, pos = start, used_out = 0, kept_bytes = 0, off;
    if (load_head(r, &head))
        return RING_E_CORRUPT;
    uint32_t n = 0, l;
    int rc = 0;
    while (n < max_records) {
        rc = next_record(r, &pos, head, &l, &off);
        if (rc <= 0)
            break;
        if (l >= big_min) { /* never with ptrs == NULL: big_min is then UINT32_MAX */
            if (n > 0 && l > out_size - kept_bytes)
                break;
            ptrs[n] = r->data + off + RING_REC_HDR;
            kept_bytes += l < out_size - kept_bytes ? l : out_size - kept_bytes;
        } else {
            if (l > out_size - used_out) {
                if (n == 0)
                    rc = RING_E_TOOBIG;
                break;
            }
            memcpy((uint8_t *)out + used_out, r->data + off + RING_REC_HDR, l);
            used_out += l;
            if (ptrs)
                ptrs[n] = NULL;
        }
        lens[n++] = l;
        pos += RING_REC_HDR + align8(l);
    }
    /* pos may have moved over a lone wrap marker even with n == 0: it is part of the
     * extent, released in order with the rest */
    *extent = pos - start;
    r->taken += pos - start;
    if (n)
        return (int)n;
    return rc < 0 ? rc : 0;
}

int ring_release_bytes(ring_t *r, uint64_t nbytes)
{
    if (r->corrupt)
        return RING_E_CORRUPT;
    if (nbytes > r->taken)
        return RING_E_INVAL;
    r->taken -= nbytes;
    release_tail(r, r->tail + nbytes);
    return 0;
}

int ring_untake(ring_t *r, uint64_t nbytes)
{
    if (r->corrupt)
        return RING_E_CORRUPT;
    if (nbytes > r->taken)
        return RING_E_INVAL;
    r->taken -= nbytes;
    return 0;
}

/* Before sleeping on "empty". Raises consumer_sleeping, then re-checks head: 1 = nothing
 * published past what the consumer has taken (records taken but not yet freed count as
 * read), the caller may sleep (the producer will see the flag after its next publish);
 * 0 = data arrived meanwhile, do not sleep (flag cleared); <0 = corrupt. */
int ring_consumer_prepare_sleep(ring_t *r)
{
    if (r->corrupt)
        return RING_E_CORRUPT;
    STORE_RLX(&r->ctrl->consumer_sleeping, 1);
    FENCE(); /* flag store before head load; pairs with the producer's fence */
    uint64_t head;
    if (load_head(r, &head))
        return RING_E_CORRUPT;
    if (head != r->tail + r->taken) { /* records past what is taken (and not yet freed) */
        STORE_RLX(&r->ctrl->consumer_sleeping, 0);
        return 0;
    }
    return 1;
}

void ring_consumer_finish_sleep(ring_t *r) { STORE_RLX(&r->ctrl->consumer_sleeping, 0); }

/* Is anything published past what the consumer has taken? 1 / 0, <0 = corrupt. Changes
 * no flag: a poller calls it instead of sleeping. */
int ring_consumer_has_data(ring_t *r)
{
    if (r->corrupt)
        return RING_E_CORRUPT;
    uint64_t head;
    if (load_head(r, &head))
        return RING_E_CORRUPT;
    return head != r->tail + r->taken;
}

/* After releasing space: must the producer be woken? Clears the flag. */
int ring_consumer_should_wake_producer(ring_t *r)
{
    FENCE(); /* tail store before flag load; pairs with the producer's prepare_wait */
    return take_flag(&r->ctrl->producer_waiting);
}

/* ---------------------------------------------------------------- snapshots */

uint64_t ring_used_bytes(const ring_t *r)
{
    uint64_t h = LOAD_ACQ(&r->ctrl->head), t = LOAD_ACQ(&r->ctrl->tail);
    uint64_t used = h - t;
    return used > r->cap ? r->cap : used;
}

int ring_is_empty(const ring_t *r)
{
    return LOAD_ACQ(&r->ctrl->head) == LOAD_ACQ(&r->ctrl->tail);
}

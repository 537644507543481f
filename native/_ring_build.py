"""cffi builder for mrpcd.native._ring (out-of-line API mode).

API mode (a real C extension compiled against ring.h) rather than ABI mode: the ring's
hot loops must run as compiled C with the compiler checking the declarations, and no
separate shared library has to be found at run time.

setup.py runs from the repository root, so the paths here are relative to it. To build
only this module: `python native/_ring_build.py` (from the repository root).
"""
import os

from cffi import FFI

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)


ffibuilder = FFI()

ffibuilder.cdef(
    """
    #define RING_CTRL_SIZE 192
    #define RING_REC_HDR 8
    #define RING_MIN_CAPACITY 64
    #define RING_MAX_CAPACITY ...
    #define RING_E_FULL -1
    #define RING_E_TOOBIG -2
    #define RING_E_CORRUPT -3
    #define RING_E_INVAL -4

    typedef struct ring { ...; } ring_t;

    int ring_init(ring_t *r, void *base, uint64_t capacity);
    int ring_attach(ring_t *r, void *base, uint64_t capacity);

    int ring_try_push(ring_t *r, const void *buf, uint32_t len);
    int ring_push_many(ring_t *r, const void *const *bufs, const uint32_t *lens, uint32_t n);
    int ring_push_packed(ring_t *r, const void *base, const uint32_t *lens, uint32_t n);
    struct ring_seg { const void *p; uint32_t len; };
    int ring_push_segs(ring_t *r, const struct ring_seg *segs, const uint32_t *nsegs, uint32_t n);
    int ring_reserve(ring_t *r, uint32_t len, uint8_t **data);
    void ring_commit(ring_t *r);
    void ring_unreserve(ring_t *r);
    int ring_producer_prepare_wait(ring_t *r, uint32_t len);
    void ring_producer_finish_wait(ring_t *r);
    int ring_producer_should_wake(ring_t *r);

    int ring_peek(ring_t *r, const uint8_t **data, uint32_t *len);
    void ring_pop(ring_t *r);
    int ring_pop_batch(ring_t *r, void *out, uint64_t out_size, uint32_t *lens,
                       uint32_t max_records);
    int ring_take_batch(ring_t *r, void *out, uint64_t out_size, uint32_t *lens,
                        const uint8_t **ptrs, uint32_t max_records, uint32_t big_min);
    void ring_release(ring_t *r);
    int ring_take_more(ring_t *r, void *out, uint64_t out_size, uint32_t *lens,
                       const uint8_t **ptrs, uint32_t max_records, uint32_t big_min, uint64_t *extent);
    int ring_release_bytes(ring_t *r, uint64_t nbytes);
    int ring_untake(ring_t *r, uint64_t nbytes);
    int ring_consumer_prepare_sleep(ring_t *r);
    void ring_consumer_finish_sleep(ring_t *r);
    int ring_consumer_has_data(ring_t *r);
    int ring_consumer_should_wake_producer(ring_t *r);

    uint64_t ring_used_bytes(const ring_t *r);
    int ring_is_empty(const ring_t *r);
    """
)


def _set_source(root: str) -> None:
    ffibuilder.set_source(
        "mrpcd.native._ring",
        '#include "ring.h"',
        sources=[os.path.join(root, "native", "ring.c")],
        include_dirs=[os.path.join(root, "native")],
        depends=[os.path.join(root, "native", "ring.h")],
        extra_compile_args=["-O2", "-std=gnu11"],
    )


# setup.py runs from the repository root: keep the paths relative to it there. Run as a
# script, compile() works inside a temporary directory: then the paths are absolute.
_set_source(_ROOT if __name__ == "__main__" or os.path.abspath(os.getcwd()) != _ROOT else "")

if __name__ == "__main__":
    # Standalone build: put the extension next to ring.py (what build_ext --inplace does).
    ffibuilder.compile(tmpdir=os.path.join(_ROOT, "build", "cffi_ring"), verbose=False)
    import glob
    import shutil

    for so in glob.glob(os.path.join(_ROOT, "build", "cffi_ring", "mrpcd", "native", "_ring*.so")):
        shutil.copy(so, _HERE)
        print("built", os.path.join("native", os.path.basename(so)))

// c_api.h: the C ABI of libellm_alloc_core.so.
//
// Two audiences:
//  * torch: ellm_malloc / ellm_free and the optional hooks, installed through
//    torch.cuda.memory.CUDAPluggableAllocator. They route by device to the
//    pool bound to that device (created on first use from ellm_configure()).
//  * everyone else (Python via ctypes, the KV manager, tests, benchmarks):
//    explicit ellm_pool handles. Calls return a status (0 = ok) and leave a
//    message for ellm_last_error() in the calling thread.
// Every entry point checks its arguments (NULL handles, owners, chunk ids,
// sizes) and no C++ exception crosses this ABI, with one deliberate
// exception: ellm_malloc's out-of-memory thrower, which torch expects.
// Sizes: an arena reserves at most 2^47 bytes (128 TiB) of VA; an allocation
// above the arena's VA fails as out of memory, saying so; a KV space has at
// most 2^24 pages. Handles are checked for NULL only: a destroyed handle
// cannot be told from a live one, and KV spaces must be destroyed before the
// pool they draw on.
#pragma once

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#ifdef __cplusplus
extern "C" {
#endif
// The library is built with hidden visibility; this ABI is what it exports.
#pragma GCC visibility push(default)

typedef struct ellm_pool ellm_pool;  // one device: backend + chunk pool + torch arena
typedef size_t (*ellm_reclaim_fn)(void* ctx, size_t want);

typedef struct {
  uint64_t allocated_bytes, allocated_peak;
  uint64_t active_bytes, active_peak;
  uint64_t reserved_bytes, reserved_peak;
  uint64_t cached_bytes, va_bytes;
  uint64_t num_allocs, num_frees, fast_allocs;
  uint64_t chunk_maps, chunk_unmaps, chunk_moves;
  uint64_t cache_flushes, ooms, invalid_frees, live_blocks;
  // pool
  uint64_t chunk_bytes, budget_bytes, created_chunks, free_chunks;
  uint64_t chunk_creates, reclaim_calls, failed_acquires, num_owners;
} ellm_stats;

typedef struct {
  char name[64];
  uint64_t held_chunks, peak_chunks, received, given, reclaimed;
  int32_t active;
} ellm_owner_stats;

// ---- errors ----
const char* ellm_last_error(void);
int ellm_last_status(void);
const char* ellm_build_info(void);  // compiler, backends compiled in

// ---- pools ----
// backend: "cuda" or "host". budget_bytes > 0 wins over budget_fraction
// (a fraction of the device's free memory now). chunk_bytes 0 = granularity.
// va_bytes 0 = 4 x budget (at least 1 GiB). prealloc: chunks created up front.
ellm_pool* ellm_pool_create(const char* backend, int device, size_t budget_bytes,
                            double budget_fraction, size_t chunk_bytes, size_t va_bytes,
                            size_t prealloc_bytes);
// Returns the number of live blocks that were leaked (0 on a clean teardown).
int64_t ellm_pool_destroy(ellm_pool* pool);

void* ellm_pool_malloc(ellm_pool* pool, size_t size, uintptr_t stream);  // NULL + error on failure
int ellm_pool_free(ellm_pool* pool, void* ptr, uintptr_t stream);
int ellm_pool_record_stream(ellm_pool* pool, void* ptr, uintptr_t stream);
size_t ellm_pool_empty_cache(ellm_pool* pool);
void ellm_pool_stats(ellm_pool* pool, ellm_stats* out);
int ellm_pool_owner_stats(ellm_pool* pool, int owner, ellm_owner_stats* out);
void ellm_pool_reset_peaks(ellm_pool* pool);
// Below the chunks created, free ones are destroyed; below those owners hold: refused.
int ellm_pool_set_budget(ellm_pool* pool, size_t budget_bytes);
// Writes "" when every invariant holds, else the first violation.
int ellm_pool_validate(ellm_pool* pool, char* msg, size_t msg_len);
const char* ellm_pool_backend(ellm_pool* pool);
int ellm_pool_device(ellm_pool* pool);
uintptr_t ellm_pool_arena_base(ellm_pool* pool);

// ---- other owners of chunks (KV spaces) ----
int ellm_pool_register_owner(ellm_pool* pool, const char* name, ellm_reclaim_fn fn, void* ctx);
// Returns once no reclaim callback runs on the owner any more; refused from
// inside the owner's own callback (it would wait for itself). A callback must
// not unregister other owners either (see pool.h, "Owner lifetime").
int ellm_pool_unregister_owner(ellm_pool* pool, int owner);
int ellm_pool_acquire(ellm_pool* pool, int owner, size_t n, uint32_t* ids);
// All or nothing: every id must be a chunk `owner` holds, listed once.
int ellm_pool_release(ellm_pool* pool, int owner, size_t n, const uint32_t* ids);
// 0 + error for an unknown id; 0 is also a valid host handle, so check
// ellm_last_status() (cleared on success).
uint64_t ellm_pool_chunk_handle(ellm_pool* pool, uint32_t id);

// Keeps `bytes` of the budget for `owner` (the arena: owner 0) alone.
int ellm_pool_set_headroom(ellm_pool* pool, int owner, size_t bytes);
// Chunks `owner` could take now without reclaiming from anyone.
size_t ellm_pool_available_chunks(ellm_pool* pool, int owner);

// ---- KV spaces: a VA range of one-chunk pages backed by pool chunks ----
typedef struct ellm_kv_space ellm_kv_space;
typedef struct {
  uint64_t mapped_pages, reclaimable_pages, maps, unmaps, reclaimed_pages;
  // swap: pages holding a host chunk, pages with a copy in flight, calls and pages each way
  uint64_t host_pages, swapping_pages, swap_outs, swap_ins, swapped_out_pages, swapped_in_pages;
} ellm_kv_stats;
ellm_kv_space* ellm_kv_create(ellm_pool* pool, const char* name, size_t n_pages);  // pages of one chunk
int64_t ellm_kv_destroy(ellm_kv_space* space);  // returns pages still mapped (now unmapped)
uintptr_t ellm_kv_base(ellm_kv_space* space);
int ellm_kv_owner(ellm_kv_space* space);
int ellm_kv_map(ellm_kv_space* space, uint32_t first, uint32_t count);  // all or none
// unmap and set_reclaimable: 1 done, 0 the pool had reclaimed the page, <0 error
int ellm_kv_unmap(ellm_kv_space* space, uint32_t page, uintptr_t stream);
int ellm_kv_set_reclaimable(ellm_kv_space* space, uint32_t page, uint32_t priority, uintptr_t stream);
int ellm_kv_pin(ellm_kv_space* space, uint32_t page);  // 1 pinned, 0 was reclaimed, <0 error
// 0 unmapped, 1 pinned, 2 reclaimable, 3 zero, 4 swapping out, 5 swapped, 6 swapping in, <0 error
int ellm_kv_state(ellm_kv_space* space, uint32_t page);
size_t ellm_kv_take_reclaimed(ellm_kv_space* space, uint32_t* pages, size_t cap);
size_t ellm_kv_reclaim(ellm_kv_space* space, size_t want_chunks);
void ellm_kv_get_stats(ellm_kv_space* space, ellm_kv_stats* out);
// Zero fill, for fixed-shape caches (kv_space.h, zero_chunk.h). on = 1: every
// page without a chunk of its own maps the pool's one zero chunk read-only
// (state 3: reads zeros, a write faults), now and whenever a page is unmapped
// or reclaimed later; mapping a page replaces its zero mapping. on = 0 takes
// the zero mappings off. Refused when already in that state.
int ellm_kv_set_zero_fill(ellm_kv_space* space, int on);
uint64_t ellm_kv_zero_pages(ellm_kv_space* space);  // pages now mapped over the zero chunk
// The pool's zero chunk: its owner in the ledger (-1 until first used), the
// KV spaces using it (it is held, 1 chunk, exactly while this is > 0), and
// the pages mapped over it in all spaces. Any output may be NULL.
int ellm_pool_zero_chunk(ellm_pool* pool, int* owner, uint64_t* users, uint64_t* mapped_pages);

// ---- the host tier: KV pages swapped to pinned host memory (host_tier.h) ----
typedef struct {
  uint64_t chunk_bytes, budget_bytes, created_chunks, free_chunks;
  uint64_t slabs, pinned_bytes, num_owners, failed_acquires;
} ellm_host_tier_stats;
// 0 turns the tier off; refused below the chunks swapped out now.
int ellm_pool_set_cpu_budget(ellm_pool* pool, size_t bytes);
void ellm_pool_host_stats(ellm_pool* pool, ellm_host_tier_stats* out);
int ellm_pool_host_owner_stats(ellm_pool* pool, int owner, ellm_owner_stats* out);
int ellm_kv_host_owner(ellm_kv_space* space);  // the space's owner in the host tier's ledger
// Swap (kv_space.h, "Swap"), all or nothing per call, each page listed once.
// swap_out: pinned or reclaimable pages are copied to host chunks after the
// work queued on `stream` (state 4, then 5 once finished); swap_in: swapped
// pages get fresh device chunks at the same VA and are copied back (state 6,
// then 1). finish_swaps ends the swaps whose copies are done (wait = 1: all
// of them) and returns how many; swap_wait makes `stream` wait for the
// copies back of the pages (on the host backend the caller waits).
int ellm_kv_swap_out(ellm_kv_space* space, const uint32_t* pages, uint32_t n, uintptr_t stream);
int ellm_kv_swap_in(ellm_kv_space* space, const uint32_t* pages, uint32_t n, uintptr_t stream);
size_t ellm_kv_finish_swaps(ellm_kv_space* space, int wait);
int ellm_kv_swap_wait(ellm_kv_space* space, const uint32_t* pages, uint32_t n, uintptr_t stream);

// ---- zero-copy tensors over pool memory ----
// A DLPack DLManagedTensor (uint8, 1-D, `nbytes` long) over [addr, addr+nbytes)
// on the pool's device (kDLCUDA or kDLCPU). Hand it to torch in a "dltensor"
// capsule; torch calls its deleter. ellm_dlpack_discard frees one torch never
// took. The view does not own or map the memory.
void* ellm_dlpack_view(ellm_pool* pool, uintptr_t addr, uint64_t nbytes);
void ellm_dlpack_discard(void* managed);
// Test-only: this pool's DLPack views say kDLCPU whatever its backend. For a
// CUDA pool on the fake driver (tests/fakecuda/), whose device memory is host
// memory, so CPU torch can read it. Never on a real GPU.
int ellm_pool_views_on_cpu(ellm_pool* pool, int on);
int64_t ellm_dlpack_live(void);  // descriptors not yet deleted (for leak tests)

// ---- host backend test controls ----
int ellm_host_hold_stream(ellm_pool* pool, uintptr_t stream);
int ellm_host_release_stream(ellm_pool* pool, uintptr_t stream);
// Waits until every copy stream has run what it can (all but work behind a
// held stream), so that tests see swaps' copies done at chosen points.
int ellm_host_drain_copies(ellm_pool* pool);
// kind 0 = chunk create, 1 = map, 2 = copy to or from host, 3 = host-tier
// allocation; the nth next such call fails; 0 disarms.
int ellm_host_inject_fault(ellm_pool* pool, int kind, int64_t nth);

// ---- the torch allocator ----
// Settings for pools created on demand by the torch entry points.
int ellm_configure(const char* backend, size_t budget_bytes, double budget_fraction,
                   size_t chunk_bytes, size_t va_bytes, size_t prealloc_bytes);
// Routes the torch entry points for `device` to an existing pool (tests use
// this with host pools). NULL unbinds.
int ellm_bind_device(int device, ellm_pool* pool);
ellm_pool* ellm_device_pool(int device);  // creates it from the configuration if needed
// How torch-facing calls report out-of-memory: thrower(msg) must not return
// (it throws a C++ exception torch understands). NULL = return NULL and set
// ellm_last_error(), for callers that check.
void ellm_set_oom_thrower(void (*thrower)(const char* msg));
void ellm_set_default_thrower(void);  // std::runtime_error("... out of memory ...")
// Calls the installed thrower with `msg` and catches what it throws; writes
// the exception's type name and message to `out`. Returns 1 if it threw.
// enable() uses it to check a freshly built torch shim before relying on it.
int ellm_probe_thrower(const char* msg, char* out, size_t out_len);

void* ellm_malloc(ssize_t size, int device, void* stream);
void ellm_free(void* ptr, ssize_t size, int device, void* stream);
void ellm_init(int device);
void ellm_reset(void);
void ellm_memory_fraction(double fraction, int device);
void ellm_record_stream(void* ptr, void* stream);

// ---- benchmark support ----
// Allocates sizes[0..n) (all live together, like one layer's tensors), then
// frees them in reverse; repeats `iters` times after one warm-up round.
// Returns ns per malloc/free pair, through the arena (use_glibc = 0) or
// glibc malloc/free (1), timed inside C so no binding overhead is counted.
// -1 + error for bad arguments (no size, a zero size, sizes beyond the arena).
double ellm_bench_pairs(ellm_pool* pool, const size_t* sizes, size_t n, size_t iters, int use_glibc);

#pragma GCC visibility pop
#ifdef __cplusplus
}
#endif

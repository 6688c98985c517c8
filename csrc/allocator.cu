// allocator.cu: the one translation unit of libellm_alloc_core.so.
//
// It compiles as CUDA with nvcc or as C++ with `g++ -x c++`: there is no
// device code, and libcuda is loaded at run time (backend_cuda.h), so the
// library loads on machines without a driver.
//
// This file holds the C ABI (c_api.h): pool handles, the per-device registry
// behind torch's entry points, error reporting and fork safety. The logic
// lives in backend_*.h, pool.h and arena.h.
#include <pthread.h>
#include <time.h>

#include <atomic>
#include <cstdio>
#include <cstring>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <typeinfo>

#include "arena.h"
#include "backend_cuda.h"
#include "backend_host.h"
#include "c_api.h"
#include "dlpack_view.h"
#include "host_tier.h"
#include "kv_space.h"
#include "zero_chunk.h"

using namespace ellm;

struct ellm_kv_space {
  std::unique_ptr<KvSpace> space;
  ZeroChunk* zero;  // the pool's, for zero fill
};

struct ellm_pool {
  std::unique_ptr<Backend> backend;
  std::unique_ptr<ChunkPool> pool;
  std::unique_ptr<HostTier> host;  // budget 0 (off) until set_cpu_budget
  std::unique_ptr<Arena> arena;
  size_t budget_bytes = 0;
  // DLPack views say kDLCPU even on a CUDA pool: only for the fake CUDA
  // driver of the tests, whose "device" memory is host memory (set by
  // ellm_pool_views_on_cpu). On a real GPU a CPU tensor there would fault.
  bool views_on_cpu = false;
  std::unique_ptr<ZeroChunk> zero;  // last: destroyed first, while the pool stands
};

namespace {

thread_local std::string t_error;
thread_local int t_status = kOk;

int fail(int status, std::string msg) {
  t_status = status;
  t_error = std::move(msg);
  return status;
}
void clear_error() {
  t_status = kOk;
  t_error.clear();
}

// No C++ exception may cross the C ABI: each entry point that can throw
// (allocation of bookkeeping, mostly) runs its body through guard(), which
// turns an exception into a status and a message and returns `on_error`.
template <class F, class R>
R guard(const char* what, R on_error, F&& body) {
  try {
    return body();
  } catch (const std::bad_alloc&) {
    fail(kOutOfMemory, std::string(what) + ": out of host memory for the allocator's bookkeeping");
  } catch (const std::exception& e) {
    fail(kBackendError, std::string(what) + ": " + e.what());
  } catch (...) {
    fail(kBackendError, std::string(what) + ": unknown C++ exception");
  }
  return on_error;
}

// Argument checks of the C ABI, each setting the error when it fails.
bool check_pool(const ellm_pool* pool, const char* what) {
  if (pool) return true;
  fail(kInvalidArgument, std::string(what) + ": NULL pool handle");
  return false;
}
bool check_space(const ellm_kv_space* space, const char* what) {
  if (space) return true;
  fail(kInvalidArgument, std::string(what) + ": NULL KV space handle");
  return false;
}
bool check_owner(ellm_pool* pool, int owner, const char* what) {
  if (pool->pool->is_active_owner(owner)) return true;
  fail(kInvalidArgument, std::string(what) + ": no active owner " + std::to_string(owner));
  return false;
}

// After fork() the child cannot use the parent's CUDA context, and its copy
// of a host pool's ledger describes chunks that belong to the parent: every
// entry point becomes inert there (malloc fails with kForkedChild, free does
// nothing). The host backend's handlers make the child's view of pool memory
// copy-on-write first, so the child can read inherited tensors and never
// writes into the parent's (backend_host.h).
std::atomic<bool> g_forked{false};
void on_fork_child() {
  HostBackend::after_fork_in_child();
  g_forked.store(true);
}
std::once_flag g_atfork_once;
void install_atfork() {
  std::call_once(g_atfork_once, [] {
    pthread_atfork(HostBackend::before_fork, HostBackend::after_fork_in_parent, on_fork_child);
  });
}

// The largest VA an arena reserves: 128 TiB, the user address space of
// x86-64 with 4-level page tables. It bounds every allocation, since a block
// lies inside the arena's VA: larger sizes fail before any rounding could
// wrap (Arena::malloc).
constexpr size_t kMaxVaBytes = size_t(1) << 47;

std::string human(size_t b) {
  char buf[32];
  const char* unit[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  double v = static_cast<double>(b);
  int u = 0;
  while (v >= 1024 && u < 4) v /= 1024, ++u;
  snprintf(buf, sizeof buf, u ? "%.2f %s" : "%.0f %s", v, unit[u]);
  return buf;
}

std::string describe_pool(ellm_pool* p) {
  ArenaStats a = p->arena->stats();
  ChunkPool::Snapshot s = p->pool->snapshot();
  std::string out = "pool(" + std::string(p->backend->name()) + ":" +
                    std::to_string(p->backend->device()) + "): budget " +
                    human(s.budget_chunks * s.chunk_bytes) + " in " + human(s.chunk_bytes) +
                    " chunks, " + std::to_string(s.created) + " created, " +
                    std::to_string(s.free) + " free; arena: " + human(a.allocated_bytes) +
                    " allocated, " + human(a.reserved_bytes) + " mapped, " +
                    human(a.cached_bytes) + " cached; chunks by owner:";
  for (auto& o : s.owners)
    if (o.active) out += " " + o.name + "=" + std::to_string(o.held);
  return out;
}

int create_pool(const char* backend, int device, size_t budget_bytes, double fraction,
                size_t chunk_bytes, size_t va_bytes, size_t prealloc, ellm_pool** out) {
  install_atfork();
  auto p = std::make_unique<ellm_pool>();
  std::string kind = backend ? backend : "";
  if (kind == "host") {
    auto hb = std::make_unique<HostBackend>(device);
    if (!hb->ok()) return fail(kBackendError, std::string("memfd_create failed: ") + strerror(errno));
    p->backend = std::move(hb);
  } else if (kind == "cuda") {
#if defined(ELLM_HAVE_CUDA_H)
    auto cb = std::make_unique<CudaBackend>(device);
    if (!cb->ok()) return fail(kUnavailable, "CUDA backend unavailable: " + cb->why());
    p->backend = std::move(cb);
#else
    return fail(kUnavailable, "this build has no CUDA backend (cuda.h was not found at build time)");
#endif
  } else {
    return fail(kInvalidArgument, "unknown backend '" + kind + "' (expected 'cuda' or 'host')");
  }
  size_t gran = p->backend->granularity();
  if (chunk_bytes == 0) chunk_bytes = gran;
  if (chunk_bytes % gran)
    return fail(kInvalidArgument, "chunk size " + std::to_string(chunk_bytes) +
                                      " is not a multiple of the granularity " + std::to_string(gran));
  if (budget_bytes == 0) {
    if (!(fraction > 0.0 && fraction <= 1.0))
      return fail(kInvalidArgument, "budget fraction must be in (0, 1], got " + std::to_string(fraction));
    size_t free_b = 0, total_b = 0;
    if (p->backend->mem_info(&free_b, &total_b) != kOk)
      return fail(kBackendError, "cannot read the device's free memory");
    budget_bytes = static_cast<size_t>(static_cast<double>(free_b) * fraction);
  }
  if (budget_bytes < chunk_bytes)
    return fail(kInvalidArgument, "budget " + human(budget_bytes) + " is smaller than one chunk (" +
                                      human(chunk_bytes) + ")");
  budget_bytes = budget_bytes / chunk_bytes * chunk_bytes;
  if (va_bytes > kMaxVaBytes)
    return fail(kInvalidArgument, "VA size " + human(va_bytes) + " is above the maximum of " + human(kMaxVaBytes));
  if (va_bytes == 0)  // 4 x budget, without wrapping for huge budgets
    va_bytes = std::max<size_t>(size_t(1) << 30, std::min(kMaxVaBytes / 4, budget_bytes) * 4);
  p->budget_bytes = budget_bytes;
  p->pool = std::make_unique<ChunkPool>(p->backend.get(), chunk_bytes, budget_bytes, prealloc);
  p->host = std::make_unique<HostTier>(p->backend.get(), chunk_bytes, 0);
  p->arena = std::make_unique<Arena>(p->pool.get(), va_bytes);
  if (!p->arena->ok()) return fail(kOutOfMemory, "cannot reserve " + human(va_bytes) + " of VA");
  p->zero = std::make_unique<ZeroChunk>(p->pool.get());
  *out = p.release();
  return kOk;
}

// ---- the torch-facing registry ----

constexpr int kMaxDevices = 64;
// A KV space's pages: 2^24 pages of 2 MiB = 32 TiB of VA, beyond any device.
constexpr size_t kMaxKvPages = size_t(1) << 24;
struct Config {
  std::string backend = "cuda";
  size_t budget_bytes = 0;
  double fraction = 0.9;
  size_t chunk_bytes = 0, va_bytes = 0, prealloc = 0;
};
std::mutex g_registry_mu;
Config g_config;
std::atomic<ellm_pool*> g_devices[kMaxDevices];
bool g_owned[kMaxDevices];  // created by the registry (vs bound by a caller)
std::atomic<void (*)(const char*)> g_thrower{nullptr};

[[noreturn]] void default_thrower(const char* msg) { throw std::runtime_error(msg); }

ellm_pool* device_pool(int device) {
  if (device < 0 || device >= kMaxDevices) {
    fail(kInvalidArgument, "device index " + std::to_string(device) + " out of range");
    return nullptr;
  }
  ellm_pool* p = g_devices[device].load(std::memory_order_acquire);
  if (p) return p;
  std::lock_guard<std::mutex> g(g_registry_mu);
  p = g_devices[device].load();
  if (p) return p;
  const Config& c = g_config;
  if (create_pool(c.backend.c_str(), device, c.budget_bytes, c.fraction, c.chunk_bytes, c.va_bytes,
                  c.prealloc, &p) != kOk)
    return nullptr;
  g_owned[device] = true;
  g_devices[device].store(p, std::memory_order_release);
  return p;
}

ellm_pool* pool_of(void* ptr) {
  uintptr_t a = reinterpret_cast<uintptr_t>(ptr);
  for (int d = 0; d < kMaxDevices; ++d) {
    ellm_pool* p = g_devices[d].load(std::memory_order_acquire);
    if (p && p->arena->contains(a)) return p;
  }
  return nullptr;
}

const char* status_name(int s) {
  switch (s) {
    case kOutOfMemory: return "out of memory";
    case kInvalidPointer: return "pointer not owned by this allocator";
    case kDoubleFree: return "double free (block is not live)";
    case kBackendError: return "backend error";
    case kInvalidArgument: return "invalid argument";
    case kForkedChild: return "allocator used in a fork child";
    case kInjectedFault: return "injected fault";
    case kUnavailable: return "unavailable";
    default: return "ok";
  }
}

}  // namespace

static void pool_stats(ellm_pool* pool, ellm_stats* out);
static double bench_pairs(ellm_pool* pool, const size_t* sizes, size_t n, size_t iters, int use_glibc);
static int owner_stats(ellm_pool* pool, int owner, ellm_owner_stats* out);

extern "C" {

const char* ellm_last_error(void) { return t_error.c_str(); }
int ellm_last_status(void) { return t_status; }

const char* ellm_build_info(void) {
  return
#if defined(__CUDACC__)
      "compiler=nvcc"
#else
      "compiler=c++"
#endif
#if defined(ELLM_HAVE_CUDA_H)
      " backends=cuda,host";
#else
      " backends=host";
#endif
}

ellm_pool* ellm_pool_create(const char* backend, int device, size_t budget_bytes,
                            double budget_fraction, size_t chunk_bytes, size_t va_bytes,
                            size_t prealloc_bytes) {
  clear_error();
  return guard("pool creation", static_cast<ellm_pool*>(nullptr), [&] {
    ellm_pool* p = nullptr;
    create_pool(backend, device, budget_bytes, budget_fraction, chunk_bytes, va_bytes, prealloc_bytes, &p);
    return p;
  });
}

int64_t ellm_pool_destroy(ellm_pool* pool) {
  if (!pool) return 0;
  {
    std::lock_guard<std::mutex> g(g_registry_mu);
    for (int d = 0; d < kMaxDevices; ++d)
      if (g_devices[d].load() == pool) g_devices[d].store(nullptr);
  }
  int64_t leaked = static_cast<int64_t>(pool->arena->teardown());
  delete pool;
  return leaked;
}

void* ellm_pool_malloc(ellm_pool* pool, size_t size, uintptr_t stream) {
  if (g_forked.load(std::memory_order_relaxed)) {
    fail(kForkedChild, "ellm_alloc cannot allocate in a forked child process");
    return nullptr;
  }
  if (size == 0 || !check_pool(pool, "malloc")) return nullptr;
  void* out = nullptr;
  int r;
  try {  // zero cost unless thrown; only the arena's bookkeeping can throw
    r = pool->arena->malloc(size, stream, &out);
  } catch (const std::bad_alloc&) {
    r = kOutOfMemory;
  }
  if (r != kOk) {
    size_t va = pool->arena->stats().va_bytes;
    fail(r, std::string(r == kOutOfMemory ? "out of memory" : status_name(r)) + ": tried to allocate " +
                human(size) +
                (size > va ? ", more than the arena's whole VA (" + human(va) + "): no allocation this large can succeed"
                           : "; " + describe_pool(pool)));
    return nullptr;
  }
  return out;
}

int ellm_pool_free(ellm_pool* pool, void* ptr, uintptr_t stream) {
  if (g_forked.load(std::memory_order_relaxed) || ptr == nullptr) return kOk;
  if (!check_pool(pool, "free")) return kInvalidArgument;
  int r = guard("free", int(kBackendError), [&] { return pool->arena->free(ptr, stream); });
  if (r != kOk) {
    char buf[64];
    snprintf(buf, sizeof buf, "%p", ptr);
    return fail(r, std::string("free(") + buf + "): " + status_name(r));
  }
  return kOk;
}

int ellm_pool_record_stream(ellm_pool* pool, void* ptr, uintptr_t stream) {
  if (!check_pool(pool, "record_stream")) return kInvalidArgument;
  int r = guard("record_stream", int(kBackendError), [&] { return pool->arena->record_stream(ptr, stream); });
  return r == kOk ? kOk : fail(r, std::string("record_stream: ") + status_name(r));
}

size_t ellm_pool_empty_cache(ellm_pool* pool) {
  if (!check_pool(pool, "empty_cache")) return 0;
  return guard("empty_cache", size_t(0), [&] { return pool->arena->empty_cache(); });
}

void ellm_pool_stats(ellm_pool* pool, ellm_stats* out) {
  if (!check_pool(pool, "stats") || !out) return;
  guard("stats", 0, [&] { pool_stats(pool, out); return 0; });
}

}  // extern "C"

static void pool_stats(ellm_pool* pool, ellm_stats* out) {
  ArenaStats a = pool->arena->stats();
  ChunkPool::Snapshot s = pool->pool->snapshot();
  *out = ellm_stats{a.allocated_bytes, a.allocated_peak, a.active_bytes, a.active_peak,
                    a.reserved_bytes, a.reserved_peak, a.cached_bytes, a.va_bytes,
                    a.num_allocs, a.num_frees, a.fast_allocs, a.chunk_maps, a.chunk_unmaps,
                    a.chunk_moves, a.cache_flushes, a.ooms, a.invalid_frees, a.live_blocks,
                    s.chunk_bytes, s.budget_chunks * s.chunk_bytes, s.created, s.free,
                    s.creates, s.reclaim_calls, s.failed_acquires, s.owners.size()};
}

extern "C" {

int ellm_pool_owner_stats(ellm_pool* pool, int owner, ellm_owner_stats* out) {
  if (!check_pool(pool, "owner_stats")) return kInvalidArgument;
  if (!out) return fail(kInvalidArgument, "owner_stats: NULL output");
  return guard("owner_stats", int(kOutOfMemory), [&] { return owner_stats(pool, owner, out); });
}

}  // extern "C"

static int owner_stats(ellm_pool* pool, int owner, ellm_owner_stats* out) {
  ChunkPool::Snapshot s = pool->pool->snapshot();
  if (owner < 0 || owner >= static_cast<int>(s.owners.size()))
    return fail(kInvalidArgument, "no owner " + std::to_string(owner));
  const auto& o = s.owners[owner];
  memset(out, 0, sizeof *out);
  snprintf(out->name, sizeof out->name, "%s", o.name.c_str());
  out->held_chunks = o.held;
  out->peak_chunks = o.peak;
  out->received = o.received;
  out->given = o.given;
  out->reclaimed = o.reclaimed;
  out->active = o.active;
  return kOk;
}

extern "C" {

void ellm_pool_reset_peaks(ellm_pool* pool) {
  if (check_pool(pool, "reset_peaks")) pool->arena->reset_peaks();
}

int ellm_pool_set_budget(ellm_pool* pool, size_t budget_bytes) {
  if (!check_pool(pool, "set_budget")) return kInvalidArgument;
  size_t chunk = pool->pool->chunk_bytes();
  if (budget_bytes < chunk)
    return fail(kInvalidArgument, "budget " + human(budget_bytes) + " is smaller than one chunk (" + human(chunk) + ")");
  int r = guard("set_budget", int(kOutOfMemory), [&] {
    if (pool->pool->set_budget(budget_bytes) == kOk) return int(kOk);
    // Owners hold more than the new budget: first take back what holds no
    // live data (the arena's cached chunks, reclaimable KV pages), as an
    // acquire would, then try again.
    size_t want = budget_bytes / chunk, held = pool->pool->held_chunks();
    if (held > want) pool->pool->reclaim_from_others(kNoOwner, held - want);
    return pool->pool->set_budget(budget_bytes);
  });
  if (r != kOk)
    return fail(kInvalidArgument, "budget " + human(budget_bytes) + " is below the " +
                                      std::to_string(pool->pool->held_chunks()) + " chunks owners hold (" +
                                      human(pool->pool->held_chunks() * chunk) + ") in use; free memory first");
  pool->budget_bytes = budget_bytes / chunk * chunk;
  return kOk;
}

int ellm_pool_validate(ellm_pool* pool, char* msg, size_t msg_len) {
  if (!check_pool(pool, "validate")) return kInvalidArgument;
  return guard("validate", int(kOutOfMemory), [&] {
    std::string v = pool->arena->validate();
    if (v.empty()) v = pool->zero->validate();
    if (v.empty() && !pool->host->pool().ledger_balanced())
      v = "host tier ledger: created != free + sum(held), or created above the cpu budget";
    if (msg && msg_len) snprintf(msg, msg_len, "%s", v.c_str());
    return v.empty() ? int(kOk) : int(kInvalidArgument);
  });
}

const char* ellm_pool_backend(ellm_pool* pool) { return pool ? pool->backend->name() : ""; }
int ellm_pool_device(ellm_pool* pool) { return pool ? pool->backend->device() : -1; }
uintptr_t ellm_pool_arena_base(ellm_pool* pool) { return pool ? pool->arena->base() : 0; }

int ellm_pool_register_owner(ellm_pool* pool, const char* name, ellm_reclaim_fn fn, void* ctx) {
  if (!check_pool(pool, "register_owner")) return -kInvalidArgument;
  return guard("register_owner", -int(kOutOfMemory), [&] { return pool->pool->register_owner(name, fn, ctx); });
}
int ellm_pool_unregister_owner(ellm_pool* pool, int owner) {
  if (!check_pool(pool, "unregister_owner") || !check_owner(pool, owner, "unregister_owner"))
    return kInvalidArgument;
  if (pool->pool->in_own_callback(owner))
    return fail(kInvalidArgument, "unregister_owner: owner " + std::to_string(owner) +
                                      " cannot leave from inside its own reclaim callback");
  int r = pool->pool->unregister_owner(owner);
  return r == kOk ? kOk : fail(r, "owner still holds chunks; release them first");
}
int ellm_pool_acquire(ellm_pool* pool, int owner, size_t n, uint32_t* ids) {
  if (!check_pool(pool, "acquire") || !check_owner(pool, owner, "acquire")) return kInvalidArgument;
  if (n > 0 && !ids) return fail(kInvalidArgument, "acquire: NULL id array");
  return guard("acquire", int(kOutOfMemory), [&] {
    int r = pool->pool->acquire(owner, n, ids);
    return r == kOk ? int(kOk)
                    : fail(r, "out of memory: cannot acquire " + std::to_string(n) + " chunks; " +
                                  describe_pool(pool));
  });
}
int ellm_pool_release(ellm_pool* pool, int owner, size_t n, const uint32_t* ids) {
  if (!check_pool(pool, "release")) return kInvalidArgument;
  if (n > 0 && !ids) return fail(kInvalidArgument, "release: NULL id array");
  std::string why;
  int r = pool->pool->release_checked(owner, n, ids, &why);
  return r == kOk ? kOk : fail(r, "release: " + why + "; nothing was released");
}
uint64_t ellm_pool_chunk_handle(ellm_pool* pool, uint32_t id) {
  if (!check_pool(pool, "chunk_handle")) return 0;
  if (!pool->pool->chunk_exists(id)) {
    fail(kInvalidArgument, "chunk_handle: chunk " + std::to_string(id) + " does not exist");
    return 0;
  }
  clear_error();
  return pool->pool->handle(id);
}

int ellm_pool_set_headroom(ellm_pool* pool, int owner, size_t bytes) {
  if (!check_pool(pool, "set_headroom") || !check_owner(pool, owner, "set_headroom")) return kInvalidArgument;
  size_t chunk = pool->pool->chunk_bytes();
  pool->pool->set_headroom(owner, bytes / chunk + (bytes % chunk != 0));
  return kOk;
}

size_t ellm_pool_available_chunks(ellm_pool* pool, int owner) {
  if (!check_pool(pool, "available_chunks") || !check_owner(pool, owner, "available_chunks")) return 0;
  return pool->pool->available(owner);
}

ellm_kv_space* ellm_kv_create(ellm_pool* pool, const char* name, size_t n_pages) {
  clear_error();
  if (!check_pool(pool, "KV space creation")) return nullptr;
  size_t chunk = pool->pool->chunk_bytes();
  if (n_pages == 0 || n_pages > kMaxKvPages) {
    fail(kInvalidArgument, "a KV space has 1 to " + std::to_string(kMaxKvPages) + " pages, asked for " +
                               std::to_string(n_pages));
    return nullptr;
  }
  return guard("KV space creation", static_cast<ellm_kv_space*>(nullptr), [&]() -> ellm_kv_space* {
    auto s = std::make_unique<KvSpace>(pool->pool.get(), name ? name : "kv", n_pages, pool->host.get());
    if (!s->ok()) {
      fail(kOutOfMemory, "cannot reserve " + human(chunk * n_pages) + " of VA for a KV space");
      return nullptr;
    }
    return new ellm_kv_space{std::move(s), pool->zero.get()};
  });
}
int64_t ellm_kv_destroy(ellm_kv_space* space) {
  if (!space) return 0;
  int64_t n = static_cast<int64_t>(space->space->teardown());
  delete space;
  return n;
}
uintptr_t ellm_kv_base(ellm_kv_space* space) { return check_space(space, "kv_base") ? space->space->base() : 0; }
int ellm_kv_owner(ellm_kv_space* space) { return check_space(space, "kv_owner") ? space->space->owner() : -1; }
int ellm_kv_map(ellm_kv_space* space, uint32_t first, uint32_t count) {
  if (!check_space(space, "kv_map")) return kInvalidArgument;
  int r = guard("KV map", int(kOutOfMemory), [&] { return space->space->map_pages(first, count); });
  std::string what = "KV page" + (count == 1 ? " " + std::to_string(first)
                                             : "s " + std::to_string(first) + "-" + std::to_string(first + count - 1));
  if (r == kOutOfMemory) return fail(r, "out of memory: cannot map " + what);
  return r == kOk ? kOk : fail(r, "KV map of " + what + ": " + status_name(r));
}
int ellm_kv_unmap(ellm_kv_space* space, uint32_t page, uintptr_t stream) {
  if (!check_space(space, "kv_unmap")) return -kInvalidArgument;
  int r = space->space->unmap_page(page, stream);
  if (r < 0) fail(-r, "KV unmap of page " + std::to_string(page) + ": page is not mapped");
  return r;
}
int ellm_kv_set_reclaimable(ellm_kv_space* space, uint32_t page, uint32_t priority, uintptr_t stream) {
  if (!check_space(space, "kv_set_reclaimable")) return -kInvalidArgument;
  int r = guard("KV set_reclaimable", -int(kOutOfMemory),
                [&] { return space->space->set_reclaimable(page, priority, stream); });
  if (r < 0) fail(-r, "KV page " + std::to_string(page) + " is not mapped");
  return r;
}
int ellm_kv_pin(ellm_kv_space* space, uint32_t page) {
  if (!check_space(space, "kv_pin")) return -kInvalidArgument;
  int r = space->space->pin(page);
  if (r < 0) fail(-r, "KV page " + std::to_string(page) + " out of range");
  return r;
}
int ellm_kv_state(ellm_kv_space* space, uint32_t page) {
  if (!check_space(space, "kv_state")) return -kInvalidArgument;
  if (page >= space->space->n_pages())
    return -fail(kInvalidArgument, "KV state of page " + std::to_string(page) + ": out of range (" +
                                       std::to_string(space->space->n_pages()) + " pages)");
  return space->space->state(page);
}
int ellm_kv_set_zero_fill(ellm_kv_space* space, int on) {
  if (!check_space(space, "kv_set_zero_fill")) return kInvalidArgument;
  if (on != 0 && on != 1) return fail(kInvalidArgument, "kv_set_zero_fill: on must be 0 or 1, got " + std::to_string(on));
  return guard("kv_set_zero_fill", int(kOutOfMemory), [&] {
    if (!on) {
      if (space->space->clear_zero_fill() != kOk) return fail(kInvalidArgument, "kv_set_zero_fill(0): zero fill is off");
      clear_error();
      return int(kOk);
    }
    std::string why;
    int r = space->space->set_zero_fill(space->zero, &why);
    if (r != kOk) return fail(r, "kv_set_zero_fill: " + why);
    clear_error();
    return int(kOk);
  });
}
uint64_t ellm_kv_zero_pages(ellm_kv_space* space) {
  return check_space(space, "kv_zero_pages") ? space->space->stats().zero_pages : 0;
}
int ellm_pool_zero_chunk(ellm_pool* pool, int* owner, uint64_t* users, uint64_t* mapped_pages) {
  if (!check_pool(pool, "zero_chunk")) return kInvalidArgument;
  if (owner) *owner = pool->zero->owner();
  if (users) *users = pool->zero->users();
  if (mapped_pages) *mapped_pages = static_cast<uint64_t>(std::max<int64_t>(pool->zero->mapped_pages(), 0));
  return kOk;
}
size_t ellm_kv_take_reclaimed(ellm_kv_space* space, uint32_t* pages, size_t cap) {
  if (!check_space(space, "kv_take_reclaimed")) return 0;
  if (cap > 0 && !pages) {
    fail(kInvalidArgument, "kv_take_reclaimed: NULL page array");
    return 0;
  }
  return guard("kv_take_reclaimed", size_t(0), [&] { return space->space->take_reclaimed(pages, cap); });
}
size_t ellm_kv_reclaim(ellm_kv_space* space, size_t want_chunks) {
  if (!check_space(space, "kv_reclaim")) return 0;
  return guard("kv_reclaim", size_t(0), [&] { return space->space->reclaim(want_chunks); });
}
void ellm_kv_get_stats(ellm_kv_space* space, ellm_kv_stats* out) {
  if (!check_space(space, "kv_stats") || !out) return;
  KvSpace::Stats s = space->space->stats();
  *out = ellm_kv_stats{s.mapped_pages, s.reclaimable_pages, s.maps, s.unmaps, s.reclaimed_pages,
                       s.host_pages, s.swapping_pages, s.swap_outs, s.swap_ins, s.swapped_out_pages,
                       s.swapped_in_pages};
}
int ellm_kv_host_owner(ellm_kv_space* space) {
  return check_space(space, "kv_host_owner") ? space->space->host_owner() : -1;
}

// ---- swap: the host tier ----
static int swap_call(ellm_kv_space* space, const uint32_t* pages, uint32_t n, const char* what,
                     int (KvSpace::*fn)(const uint32_t*, uint32_t, StreamId, std::string*), uintptr_t stream) {
  if (!check_space(space, what)) return kInvalidArgument;
  if (n > 0 && !pages) return fail(kInvalidArgument, std::string(what) + ": NULL page array");
  return guard(what, int(kOutOfMemory), [&] {
    std::string why;
    int r = (space->space.get()->*fn)(pages, n, stream, &why);
    if (r != kOk) return fail(r, std::string(what) + ": " + why);
    clear_error();
    return int(kOk);
  });
}
int ellm_kv_swap_out(ellm_kv_space* space, const uint32_t* pages, uint32_t n, uintptr_t stream) {
  return swap_call(space, pages, n, "kv_swap_out", &KvSpace::swap_out, stream);
}
int ellm_kv_swap_in(ellm_kv_space* space, const uint32_t* pages, uint32_t n, uintptr_t stream) {
  return swap_call(space, pages, n, "kv_swap_in", &KvSpace::swap_in, stream);
}
size_t ellm_kv_finish_swaps(ellm_kv_space* space, int wait) {
  if (!check_space(space, "kv_finish_swaps")) return 0;
  return guard("kv_finish_swaps", size_t(0), [&] { return space->space->finish_swaps(wait != 0); });
}
int ellm_kv_swap_wait(ellm_kv_space* space, const uint32_t* pages, uint32_t n, uintptr_t stream) {
  if (!check_space(space, "kv_swap_wait")) return kInvalidArgument;
  if (n > 0 && !pages) return fail(kInvalidArgument, "kv_swap_wait: NULL page array");
  int r = space->space->swap_wait(pages, n, stream);
  return r == kOk ? kOk : fail(r, "kv_swap_wait: a page is out of range, or the stream could not wait");
}

int ellm_pool_set_cpu_budget(ellm_pool* pool, size_t bytes) {
  if (!check_pool(pool, "set_cpu_budget")) return kInvalidArgument;
  int r = guard("set_cpu_budget", int(kOutOfMemory), [&] { return pool->host->set_budget(bytes); });
  if (r != kOk)
    return fail(r, "cpu budget " + human(bytes) + " is below the " + human(pool->host->pool().held_chunks() *
                                                                           pool->host->chunk_bytes()) +
                       " swapped out now; swap in or free those requests first");
  clear_error();
  return kOk;
}
void ellm_pool_host_stats(ellm_pool* pool, ellm_host_tier_stats* out) {
  if (!check_pool(pool, "host_stats") || !out) return;
  ChunkPool::Snapshot s = pool->host->pool().snapshot();
  HostSlabs::Stats slabs = pool->host->slab_stats();
  *out = ellm_host_tier_stats{s.chunk_bytes, s.budget_chunks * s.chunk_bytes, s.created, s.free,
                              slabs.slabs, slabs.pinned_bytes, s.owners.size(), s.failed_acquires};
}
int ellm_pool_host_owner_stats(ellm_pool* pool, int owner, ellm_owner_stats* out) {
  if (!check_pool(pool, "host_owner_stats") || !out) return kInvalidArgument;
  ChunkPool::Snapshot s = pool->host->pool().snapshot();
  if (owner < 0 || owner >= static_cast<int>(s.owners.size()))
    return fail(kInvalidArgument, "no host-tier owner " + std::to_string(owner));
  const auto& o = s.owners[owner];
  memset(out, 0, sizeof *out);
  snprintf(out->name, sizeof out->name, "%s", o.name.c_str());
  out->held_chunks = o.held;
  out->peak_chunks = o.peak;
  out->active = o.active;
  return kOk;
}

static HostBackend* host_of(ellm_pool* pool) {
  return pool ? dynamic_cast<HostBackend*>(pool->backend.get()) : nullptr;
}
int ellm_host_hold_stream(ellm_pool* pool, uintptr_t stream) {
  HostBackend* h = host_of(pool);
  if (!h) return fail(kInvalidArgument, "not a host pool");
  h->hold_stream(stream);
  return kOk;
}
int ellm_host_release_stream(ellm_pool* pool, uintptr_t stream) {
  HostBackend* h = host_of(pool);
  if (!h) return fail(kInvalidArgument, "not a host pool");
  h->release_stream(stream);
  return kOk;
}
int ellm_host_drain_copies(ellm_pool* pool) {
  HostBackend* h = host_of(pool);
  if (!h) return fail(kInvalidArgument, "not a host pool");
  h->drain_copies();
  return kOk;
}
int ellm_host_inject_fault(ellm_pool* pool, int kind, int64_t nth) {
  HostBackend* h = host_of(pool);
  if (!h) return fail(kInvalidArgument, "not a host pool");
  if (h->inject_fault(kind, nth) != kOk)
    return fail(kInvalidArgument, "fault kind must be 0 (create), 1 (map), 2 (copy) or 3 (host allocation)");
  return kOk;
}

int ellm_configure(const char* backend, size_t budget_bytes, double budget_fraction,
                   size_t chunk_bytes, size_t va_bytes, size_t prealloc_bytes) {
  std::lock_guard<std::mutex> g(g_registry_mu);
  g_config = Config{backend ? backend : "cuda", budget_bytes, budget_fraction, chunk_bytes, va_bytes,
                    prealloc_bytes};
  return kOk;
}

int ellm_bind_device(int device, ellm_pool* pool) {
  if (device < 0 || device >= kMaxDevices) return fail(kInvalidArgument, "device out of range");
  std::lock_guard<std::mutex> g(g_registry_mu);
  ellm_pool* old = g_devices[device].load();
  if (old && g_owned[device] && pool != old)
    return fail(kInvalidArgument, "device already has a pool created by the allocator");
  g_owned[device] = false;
  g_devices[device].store(pool, std::memory_order_release);
  return kOk;
}

ellm_pool* ellm_device_pool(int device) {
  clear_error();
  return device_pool(device);
}

void ellm_set_oom_thrower(void (*thrower)(const char*)) { g_thrower.store(thrower); }
void ellm_set_default_thrower(void) { g_thrower.store(&default_thrower); }

int ellm_probe_thrower(const char* msg, char* out, size_t out_len) {
  void (*thrower)(const char*) = g_thrower.load();
  if (!thrower) return 0;
  try {
    thrower(msg);
  } catch (const std::exception& e) {
    snprintf(out, out_len, "%s: %s", typeid(e).name(), e.what());
    return 1;
  } catch (...) {
    snprintf(out, out_len, "non-std exception");
    return 1;
  }
  return 0;
}

// torch: void* malloc(ssize_t size, int device, cudaStream_t stream).
// Never NULL for a non-zero size: torch does not check. With a thrower
// installed (enable() installs one) a failure throws; without one (tests
// calling through ctypes) it returns NULL and sets ellm_last_error().
void* ellm_malloc(ssize_t size, int device, void* stream) {
  if (size <= 0) return nullptr;
  ellm_pool* p = device_pool(device);
  void* out = p ? ellm_pool_malloc(p, static_cast<size_t>(size), reinterpret_cast<uintptr_t>(stream))
                : nullptr;
  if (!out) {
    void (*thrower)(const char*) = g_thrower.load();
    if (thrower) {
      std::string msg = "CUDA " + t_error;  // "CUDA out of memory: ..." like torch's own message
      thrower(msg.c_str());
    }
  }
  return out;
}

// torch: void free(void* ptr, ssize_t size, int device, cudaStream_t stream).
// Must not throw (torch calls it from destructors): errors are reported on
// stderr and in ellm_last_error(), and counted in the stats.
void ellm_free(void* ptr, ssize_t size, int device, void* stream) {
  (void)size;
  if (!ptr || g_forked.load(std::memory_order_relaxed)) return;
  ellm_pool* p = (device >= 0 && device < kMaxDevices) ? g_devices[device].load(std::memory_order_acquire)
                                                       : nullptr;
  if (!p) p = pool_of(ptr);
  if (!p) {
    fail(kInvalidPointer, "ellm_free: no pool owns this pointer");
    fprintf(stderr, "ellm_alloc: free(%p) on device %d: no pool owns this pointer\n", ptr, device);
    return;
  }
  if (ellm_pool_free(p, ptr, reinterpret_cast<uintptr_t>(stream)) == kOk)
    t_status = kOk;  // the status describes this call, not an earlier failure
  else if (g_thrower.load())
    fprintf(stderr, "ellm_alloc: %s\n", t_error.c_str());
}

void ellm_init(int device) { device_pool(device); }

void ellm_reset(void) {
  for (int d = 0; d < kMaxDevices; ++d) {
    ellm_pool* p = g_devices[d].load(std::memory_order_acquire);
    if (p) {
      p->arena->empty_cache();
      p->pool->trim(0);
    }
  }
}

void ellm_memory_fraction(double fraction, int device) {
  if (!(fraction > 0.0 && fraction <= 1.0)) {
    fail(kInvalidArgument, "memory fraction must be in (0, 1], got " + std::to_string(fraction));
    return;
  }
  ellm_pool* p = device_pool(device);
  if (!p) return;
  size_t free_b = 0, total_b = 0;
  if (p->backend->mem_info(&free_b, &total_b) == kOk)
    ellm_pool_set_budget(p, static_cast<size_t>(static_cast<double>(total_b) * fraction));
}

void ellm_record_stream(void* ptr, void* stream) {
  ellm_pool* p = pool_of(ptr);
  if (p) ellm_pool_record_stream(p, ptr, reinterpret_cast<uintptr_t>(stream));
}

void* ellm_dlpack_view(ellm_pool* pool, uintptr_t addr, uint64_t nbytes) {
  clear_error();
  if (!check_pool(pool, "dlpack_view")) return nullptr;
  if (nbytes == 0 || nbytes > static_cast<uint64_t>(INT64_MAX) || addr > UINTPTR_MAX - nbytes) {
    fail(kInvalidArgument, "dlpack_view: " + std::to_string(nbytes) + " bytes at " + std::to_string(addr) +
                               " is not a valid range (1 to 2^63-1 bytes, not wrapping the address space)");
    return nullptr;
  }
  bool host = std::strcmp(pool->backend->name(), "host") == 0 || pool->views_on_cpu;
  DLManagedTensor* t = make_byte_view(addr, nbytes, host ? kDLCPU : kDLCUDA, pool->backend->device());
  if (!t) fail(kOutOfMemory, "cannot allocate a DLPack descriptor");
  return t;
}

int ellm_pool_views_on_cpu(ellm_pool* pool, int on) {
  if (!check_pool(pool, "views_on_cpu")) return kInvalidArgument;
  pool->views_on_cpu = on != 0;
  return kOk;
}

void ellm_dlpack_discard(void* managed) {
  if (managed) static_cast<DLManagedTensor*>(managed)->deleter(static_cast<DLManagedTensor*>(managed));
}

int64_t ellm_dlpack_live(void) { return g_live_byte_views.load(); }

double ellm_bench_pairs(ellm_pool* pool, const size_t* sizes, size_t n, size_t iters, int use_glibc) {
  if (!check_pool(pool, "bench_pairs")) return -1.0;
  if (n == 0 || !sizes || iters == 0) {
    fail(kInvalidArgument, "bench_pairs: needs at least one size and one iteration");
    return -1.0;
  }
  size_t va = pool->arena->stats().va_bytes;
  for (size_t i = 0; i < n; ++i)  // checked once here, so the timed loop stays the bare fast path
    if (sizes[i] == 0 || sizes[i] > va / n) {
      fail(kInvalidArgument, "bench_pairs: size " + std::to_string(sizes[i]) + " is 0 or the sizes do not fit the arena together");
      return -1.0;
    }
  return guard("bench_pairs", -1.0, [&] { return bench_pairs(pool, sizes, n, iters, use_glibc); });
}

}  // extern "C"

// The timed loop of ellm_bench_pairs, on arguments already checked.
static double bench_pairs(ellm_pool* pool, const size_t* sizes, size_t n, size_t iters, int use_glibc) {
  std::vector<void*> ptrs(n);
  auto round = [&] {
    if (use_glibc) {
      for (size_t i = 0; i < n; ++i) ptrs[i] = ::malloc(sizes[i]);
      for (size_t i = n; i-- > 0;) ::free(ptrs[i]);
    } else {
      for (size_t i = 0; i < n; ++i) pool->arena->malloc(sizes[i], 0, &ptrs[i]);
      for (size_t i = n; i-- > 0;) pool->arena->free(ptrs[i], 0);
    }
  };
  round();  // warm-up: fills the caches / glibc's bins
  timespec t0, t1;
  clock_gettime(CLOCK_MONOTONIC, &t0);
  for (size_t it = 0; it < iters; ++it) round();
  clock_gettime(CLOCK_MONOTONIC, &t1);
  double ns = (t1.tv_sec - t0.tv_sec) * 1e9 + (t1.tv_nsec - t0.tv_nsec);
  return ns / static_cast<double>(iters * n);
}

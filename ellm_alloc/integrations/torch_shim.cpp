// torch_shim.cpp: the one piece built against torch's own headers.
//
// The core library cannot link torch, so enable() compiles this file against
// the torch already installed (cached per torch version) and loads it. It
// holds the two hooks that need torch's C++ types:
//
//  * ellm_torch_throw_oom: torch turns a c10::OutOfMemoryError thrown by an
//    allocator into torch.OutOfMemoryError in Python (any other exception
//    becomes a plain RuntimeError). enable() hands it to ellm_set_oom_thrower().
//
//  * the CPU allocator: a c10::Allocator whose allocate/free go to a host
//    pool's arena through the core's C ABI (ellm_pool_malloc / ellm_pool_free),
//    installed with c10::SetCPUAllocator. Every CPU tensor made afterwards
//    lives in the pool; tensors made before keep the deleter they were made
//    with, since a DataPtr carries its own.
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <cstring>

extern "C" __attribute__((visibility("default"))) void ellm_torch_throw_oom(const char* msg) {
  TORCH_CHECK_WITH(OutOfMemoryError, false, msg);
}

namespace {

// The core's entry points, passed in by enable() so this file needs no link
// to the core. Status codes as in csrc/backend.h.
struct CoreApi {
  void* (*pool_malloc)(void* pool, size_t size, uintptr_t stream);
  int (*pool_free)(void* pool, void* ptr, uintptr_t stream);
  const char* (*last_error)();
  int (*last_status)();
};
constexpr int kOutOfMemory = 1;
constexpr int kForkedChild = 6;

CoreApi g_core;
void* g_pool = nullptr;
uintptr_t g_arena_lo = 0, g_arena_hi = 0;  // the arena's VA: pool memory lies in it

// One deleter for both kinds of memory, so raw_deleter() is right for every
// DataPtr this allocator makes. Outside the arena means the native fallback
// of a fork child. In a fork child pool_free does nothing: the chunk is the
// parent's.
void delete_cpu(void* ptr) {
  uintptr_t a = reinterpret_cast<uintptr_t>(ptr);
  if (a >= g_arena_lo && a < g_arena_hi)
    g_core.pool_free(g_pool, ptr, 0);
  else
    c10::free_cpu(ptr);
}

class PoolCpuAllocator final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t n) override {
    const c10::Device cpu(c10::DeviceType::CPU);
    if (n == 0) return {nullptr, nullptr, &delete_cpu, cpu};  // as torch's default allocator
    // Arena blocks are 512-byte aligned, beyond the 64 bytes torch's CPU kernels assume.
    void* p = g_core.pool_malloc(g_pool, n, 0);
    if (p) return {p, p, &delete_cpu, cpu};
    int status = g_core.last_status();
    if (status == kForkedChild) {  // a fork child may not use the parent's chunks
      void* q = c10::alloc_cpu(n);
      return {q, q, &delete_cpu, cpu};
    }
    // The arena has already flushed its caches and reclaimed from the KV
    // cache before failing; nothing was taken, so the process stays usable.
    if (status == kOutOfMemory) TORCH_CHECK_WITH(OutOfMemoryError, false, "CPU ", g_core.last_error());
    TORCH_CHECK(false, "ellm_alloc CPU allocator: ", g_core.last_error());
    return {};  // not reached: both checks throw
  }
  c10::DeleterFnPtr raw_deleter() const override { return &delete_cpu; }
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }
};

PoolCpuAllocator g_allocator;  // never destroyed before torch is: c10 keeps a raw pointer

}  // namespace

// Routes every later CPU allocation of torch to `pool`'s arena
// [arena_base, arena_base + arena_bytes). Once per process: the pool must
// outlive every tensor, so it is never destroyed. Returns 0, or -1 if called
// again with another pool.
extern "C" __attribute__((visibility("default"))) int ellm_torch_install_cpu_allocator(
    void* pool, uintptr_t arena_base, size_t arena_bytes, void* pool_malloc, void* pool_free,
    void* last_error, void* last_status) {
  if (g_pool) return g_pool == pool ? 0 : -1;
  g_core.pool_malloc = reinterpret_cast<decltype(g_core.pool_malloc)>(pool_malloc);
  g_core.pool_free = reinterpret_cast<decltype(g_core.pool_free)>(pool_free);
  g_core.last_error = reinterpret_cast<decltype(g_core.last_error)>(last_error);
  g_core.last_status = reinterpret_cast<decltype(g_core.last_status)>(last_status);
  g_arena_lo = arena_base;
  g_arena_hi = arena_base + arena_bytes;
  g_pool = pool;
  // Above the priority torch registers its default allocator with (0), so a
  // later registration at the default priority does not silently undo this.
  c10::SetCPUAllocator(&g_allocator, /*priority=*/100);
  return 0;
}

// Whether torch's CPU allocator is ours now (tests, and enable()'s check).
extern "C" __attribute__((visibility("default"))) int ellm_torch_cpu_allocator_installed() {
  return c10::GetCPUAllocator() == &g_allocator;
}

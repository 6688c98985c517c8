// fakecuda.cpp: a strict stand-in for libcuda.so.1, for tests only.
//
// It lets csrc/backend_cuda.h, unchanged, run the test suite on a machine
// without a GPU: the backend dlopen()s this library (ELLM_ALLOC_LIBCUDA names
// it) and resolves every entry point through cuGetProcAddress_v2, as it does
// with NVIDIA's driver. "Device memory" is host memory, so tests read and write
// it through real addresses:
//   reserve      mmap(PROT_NONE, MAP_NORESERVE)
//   create       a range of one memfd ("physical memory"), one per handle
//   map          mmap(MAP_SHARED|MAP_FIXED, PROT_NONE) of the handle's range
//   set access   mprotect(PROT_READ) or mprotect(PROT_READ|PROT_WRITE)
//   unmap        mmap(PROT_NONE) back over the range
//
// Strict on purpose. Every call checks the rules NVIDIA's driver API reference
// (the "CUDA Driver API" manual, docs.nvidia.com/cuda/cuda-driver-api/, groups
// CUDA_MEM, CUDA_VA, CUDA_STREAM, CUDA_EVENT, CUDA_PRIMARY_CTX, CUDA_CTX) gives
// for it, and a violation returns the error code the real driver returns,
// logged on stderr ("fakecuda: ...") and kept for fakecuda_last_violation().
// Where the manual names no code for a misuse, the code is the one the driver
// uses for that class of mistake (CUDA_ERROR_INVALID_VALUE for a bad range or
// handle value, CUDA_ERROR_INVALID_HANDLE for an unknown stream or event); the
// comment at the rule says so.
//
// Test controls (extern "C", read with ctypes): per-entry-point call counters,
// streams whose work can be held back (events on them stay NOT_READY until
// released or waited for), and injected failures of the nth next call.
//
// Configuration from the environment, read at cuInit:
//   FAKECUDA_GRANULARITY  bytes cuMemGetAllocationGranularity reports (2 MiB)
//   FAKECUDA_TOTAL_BYTES  device memory cuMemGetInfo reports and cuMemCreate
//                         may hand out (8 GiB)
//   FAKECUDA_DEVICES      device count (1)
//   FAKECUDA_QUIET=1      do not log violations on stderr
//
// Foreign streams. torch hands the allocator cudaStream_t values made by the
// CUDA runtime, which this library never saw created. fakecuda_set_foreign_streams(1)
// accepts any stream value as such a stream (the test suite's stream numbers);
// off (the default), only 0, CU_STREAM_LEGACY, CU_STREAM_PER_THREAD and
// streams made by cuStreamCreate are valid.
#include <cuda.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <iterator>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <set>
#include <string>
#include <unordered_map>
#include <vector>

#define FAKE_EXPORT extern "C" __attribute__((visibility("default")))

namespace {

// ---- call accounting --------------------------------------------------------

// The entry points, in one list: counters, cuGetProcAddress and the tests all
// index it. Base names (what backend_cuda.h asks cuGetProcAddress for).
#define FAKECUDA_ENTRY_POINTS(X)                                                             \
  X(cuInit) X(cuDeviceGetCount) X(cuDeviceGet) X(cuDevicePrimaryCtxRetain) X(cuDevicePrimaryCtxRelease)           \
  X(cuCtxGetCurrent) X(cuCtxSetCurrent) X(cuMemGetAllocationGranularity)                     \
  X(cuMemAddressReserve) X(cuMemAddressFree) X(cuMemCreate) X(cuMemRelease) X(cuMemMap)      \
  X(cuMemUnmap) X(cuMemSetAccess) X(cuMemGetInfo) X(cuMemcpyDtoHAsync) X(cuMemcpyHtoDAsync)  \
  X(cuStreamCreate) X(cuStreamDestroy) X(cuStreamSynchronize) X(cuStreamWaitEvent)           \
  X(cuEventCreate) X(cuEventRecord) X(cuEventQuery) X(cuEventSynchronize) X(cuEventDestroy)  \
  X(cuMemHostAlloc) X(cuMemFreeHost) X(cuGetErrorString)

enum Entry : int {
#define FAKE_ENUM(name) k_##name,
  FAKECUDA_ENTRY_POINTS(FAKE_ENUM)
#undef FAKE_ENUM
  kEntries
};
const char* const kEntryNames[kEntries] = {
#define FAKE_NAME(name) #name,
    FAKECUDA_ENTRY_POINTS(FAKE_NAME)
#undef FAKE_NAME
};

std::atomic<uint64_t> g_calls[kEntries];

// ---- driver state -----------------------------------------------------------

struct Reservation {
  size_t bytes;
  size_t mapped_bytes = 0;
};
struct Allocation {  // one cuMemCreate handle
  size_t bytes;
  off_t offset;         // its range of the memfd
  bool released = false;  // cuMemRelease called; lives on while mapped
  int mappings = 0;
};
struct Mapping {
  size_t bytes;
  CUmemGenericAllocationHandle handle;
  int access = 0;  // 0: none yet, else PROT_READ or PROT_READ|PROT_WRITE
};
struct Stream {
  uint64_t recorded = 0, completed = 0;
  bool held = false;
};
struct Event {
  CUstream stream = nullptr;
  uint64_t seq = 0;
  bool recorded = false;
};
struct Context {  // one primary context per device
  int device;
  int retains = 0;
};

struct Driver {
  std::mutex mu;
  bool initialized = false;
  bool quiet = false;
  bool foreign_streams = false;
  size_t granularity = 2u << 20;
  size_t total = size_t(8) << 30;
  size_t used = 0;
  int devices = 1;
  std::vector<Context> contexts;
  int fd = -1;
  off_t file_bytes = 0;
  std::map<size_t, std::vector<off_t>> free_offsets;  // by size, for reuse
  std::map<uintptr_t, Reservation> reservations;
  std::unordered_map<CUmemGenericAllocationHandle, Allocation> allocations;
  CUmemGenericAllocationHandle next_handle = 0x1001;
  std::map<uintptr_t, Mapping> mappings;
  std::map<CUstream, Stream> streams;   // keyed by handle; 0/legacy/per-thread included
  std::set<CUstream> created_streams;
  std::set<CUevent> events;
  std::map<void*, size_t> host_allocs;
  // Injected failures: the nth next call of an entry point returns `code`.
  int64_t fail_countdown[kEntries] = {};
  CUresult fail_code[kEntries] = {};
  std::string last_violation;
  uint64_t violations = 0;
};
Driver& drv() {
  static Driver* d = new Driver;  // leaked: the backend may call in during exit
  return *d;
}
thread_local Context* t_current = nullptr;

const char* code_name(CUresult r) {
  switch (r) {
    case CUDA_SUCCESS: return "CUDA_SUCCESS";
    case CUDA_ERROR_INVALID_VALUE: return "CUDA_ERROR_INVALID_VALUE";
    case CUDA_ERROR_OUT_OF_MEMORY: return "CUDA_ERROR_OUT_OF_MEMORY";
    case CUDA_ERROR_NOT_INITIALIZED: return "CUDA_ERROR_NOT_INITIALIZED";
    case CUDA_ERROR_INVALID_DEVICE: return "CUDA_ERROR_INVALID_DEVICE";
    case CUDA_ERROR_INVALID_CONTEXT: return "CUDA_ERROR_INVALID_CONTEXT";
    case CUDA_ERROR_INVALID_HANDLE: return "CUDA_ERROR_INVALID_HANDLE";
    case CUDA_ERROR_NOT_FOUND: return "CUDA_ERROR_NOT_FOUND";
    case CUDA_ERROR_NOT_READY: return "CUDA_ERROR_NOT_READY";
    default: return "CUDA_ERROR_UNKNOWN";
  }
}

// Records and logs a contract violation; returns its code. Called with the
// driver lock held.
CUresult violation(CUresult code, const char* fn, const char* fmt, ...) {
  Driver& d = drv();
  char msg[512];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(msg, sizeof msg, fmt, ap);
  va_end(ap);
  d.last_violation = std::string(fn) + ": " + msg + " -> " + code_name(code);
  ++d.violations;
  if (!d.quiet) fprintf(stderr, "fakecuda: %s\n", d.last_violation.c_str());
  return code;
}

// Every entry point starts here: counts the call, fires an injected failure.
bool injected(Entry e, CUresult* out) {
  g_calls[e].fetch_add(1, std::memory_order_relaxed);
  Driver& d = drv();
  if (d.fail_countdown[e] > 0 && --d.fail_countdown[e] == 0) {
    *out = d.fail_code[e];
    return true;
  }
  return false;
}

// Rule: cuInit(0) comes first. "If cuInit() has not been called, any function
// from the driver API will return CUDA_ERROR_NOT_INITIALIZED" (Initialization).
bool need_init(const char* fn, CUresult* out) {
  if (drv().initialized) return true;
  *out = violation(CUDA_ERROR_NOT_INITIALIZED, fn, "called before cuInit");
  return false;
}

// Rule: a current context in the calling thread. The memory, stream and event
// calls act in "the current context" (Context Management: a thread with none
// gets CUDA_ERROR_INVALID_CONTEXT). The virtual memory calls name no context
// in the manual, but real drivers have refused cuMemAddressReserve and
// cuMemCreate on threads with none; requiring one here is stricter than the
// letter of the manual and never looser than a driver.
bool need_context(const char* fn, CUresult* out) {
  if (!need_init(fn, out)) return false;
  if (t_current && t_current->retains > 0) return true;
  *out = violation(CUDA_ERROR_INVALID_CONTEXT, fn,
                   t_current ? "the current context was released" : "no current context in this thread");
  return false;
}

bool aligned(uint64_t v) { return v % drv().granularity == 0; }

// The reservation holding [va, va+bytes), or end().
std::map<uintptr_t, Reservation>::iterator reservation_of(uintptr_t va, size_t bytes) {
  Driver& d = drv();
  auto it = d.reservations.upper_bound(va);
  if (it == d.reservations.begin()) return d.reservations.end();
  --it;
  if (va >= it->first && va + bytes <= it->first + it->second.bytes) return it;
  return d.reservations.end();
}

// Whether [va, va+bytes) is exactly a run of whole, back-to-back mappings.
bool whole_mappings(uintptr_t va, size_t bytes) {
  Driver& d = drv();
  uintptr_t a = va;
  while (a < va + bytes) {
    auto it = d.mappings.find(a);
    if (it == d.mappings.end()) return false;
    a += it->second.bytes;
  }
  return a == va + bytes;
}

// Whether every byte of [p, p+n) is mapped with at least `prot` access.
bool accessible(uintptr_t p, size_t n, int prot) {
  Driver& d = drv();
  uintptr_t a = p;
  while (a < p + n) {
    auto it = d.mappings.upper_bound(a);
    if (it == d.mappings.begin()) return false;
    --it;
    if (a >= it->first + it->second.bytes || (it->second.access & prot) != prot) return false;
    a = it->first + it->second.bytes;
  }
  return true;
}

bool known_stream(CUstream s) {
  Driver& d = drv();
  if (s == nullptr || s == CU_STREAM_LEGACY || s == CU_STREAM_PER_THREAD) return true;
  return d.created_streams.count(s) || d.foreign_streams;
}

// Rule: streams and events are handles the driver made (cuStreamCreate,
// cuEventCreate) and that are not destroyed; anything else is
// CUDA_ERROR_INVALID_HANDLE.
bool need_stream(const char* fn, CUstream s, CUresult* out) {
  if (known_stream(s)) return true;
  *out = violation(CUDA_ERROR_INVALID_HANDLE, fn, "stream %p was not created (cuStreamCreate) or was destroyed", (void*)s);
  return false;
}
bool need_event(const char* fn, CUevent e, CUresult* out) {
  if (drv().events.count(e)) return true;
  *out = violation(CUDA_ERROR_INVALID_HANDLE, fn, "event %p was not created or was destroyed", (void*)e);
  return false;
}

// Frees a handle's range of the memfd once it is released and unmapped:
// "the memory allocation will be freed when all outstanding mappings to the
// memory are unmapped and when all outstanding references to the handle ...
// are also released" (cuMemRelease).
void maybe_free(CUmemGenericAllocationHandle h) {
  Driver& d = drv();
  auto it = d.allocations.find(h);
  if (it == d.allocations.end() || !it->second.released || it->second.mappings) return;
  fallocate(d.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, it->second.offset,
            static_cast<off_t>(it->second.bytes));
  d.free_offsets[it->second.bytes].push_back(it->second.offset);
  d.used -= it->second.bytes;
  d.allocations.erase(it);
}

size_t env_size(const char* name, size_t fallback) {
  const char* v = getenv(name);
  if (!v || !*v) return fallback;
  char* end = nullptr;
  unsigned long long n = strtoull(v, &end, 0);
  return (end && *end == '\0' && n > 0) ? static_cast<size_t>(n) : fallback;
}

#define ENTER(name)                              \
  std::lock_guard<std::mutex> lock(drv().mu);    \
  CUresult fake_rc;                              \
  if (injected(k_##name, &fake_rc)) return fake_rc;
#define REQUIRE_INIT(name) \
  if (!need_init(#name, &fake_rc)) return fake_rc;
#define REQUIRE_CONTEXT(name) \
  if (!need_context(#name, &fake_rc)) return fake_rc;

}  // namespace

// ---- the driver API ---------------------------------------------------------
// Each definition repeats cuda.h's prototype (cuda.h maps some names to their
// _v2 symbols, as the real library does): a signature that drifted from the
// header would not compile.

extern "C" {

CUresult CUDAAPI cuInit(unsigned int flags) {
  ENTER(cuInit)
  Driver& d = drv();
  // "Flags parameter for cuInit(); must be 0" (cuInit).
  if (flags != 0) return violation(CUDA_ERROR_INVALID_VALUE, "cuInit", "flags %u must be 0", flags);
  if (d.initialized) return CUDA_SUCCESS;
  d.granularity = env_size("FAKECUDA_GRANULARITY", d.granularity);
  d.total = env_size("FAKECUDA_TOTAL_BYTES", d.total);
  d.devices = static_cast<int>(env_size("FAKECUDA_DEVICES", 1));
  d.quiet = getenv("FAKECUDA_QUIET") && strcmp(getenv("FAKECUDA_QUIET"), "1") == 0;
  d.fd = memfd_create("fakecuda_device_memory", MFD_CLOEXEC);
  if (d.fd < 0) return CUDA_ERROR_OUT_OF_MEMORY;
  for (int i = 0; i < d.devices; ++i) d.contexts.push_back({i, 0});
  d.initialized = true;
  return CUDA_SUCCESS;
}

CUresult CUDAAPI cuDeviceGetCount(int* count) {
  ENTER(cuDeviceGetCount)
  REQUIRE_INIT(cuDeviceGetCount)
  if (!count) return violation(CUDA_ERROR_INVALID_VALUE, "cuDeviceGetCount", "NULL output");
  *count = drv().devices;
  return CUDA_SUCCESS;
}

CUresult CUDAAPI cuDeviceGet(CUdevice* device, int ordinal) {
  ENTER(cuDeviceGet)
  REQUIRE_INIT(cuDeviceGet)
  // "CUDA_ERROR_INVALID_DEVICE" for an ordinal outside [0, cuDeviceGetCount()).
  if (ordinal < 0 || ordinal >= drv().devices)
    return violation(CUDA_ERROR_INVALID_DEVICE, "cuDeviceGet", "no device %d", ordinal);
  if (!device) return violation(CUDA_ERROR_INVALID_VALUE, "cuDeviceGet", "NULL output");
  *device = ordinal;
  return CUDA_SUCCESS;
}

CUresult CUDAAPI cuDevicePrimaryCtxRetain(CUcontext* pctx, CUdevice dev) {
  ENTER(cuDevicePrimaryCtxRetain)
  REQUIRE_INIT(cuDevicePrimaryCtxRetain)
  Driver& d = drv();
  if (dev < 0 || dev >= d.devices)
    return violation(CUDA_ERROR_INVALID_DEVICE, "cuDevicePrimaryCtxRetain", "no device %d", dev);
  if (!pctx) return violation(CUDA_ERROR_INVALID_VALUE, "cuDevicePrimaryCtxRetain", "NULL output");
  ++d.contexts[dev].retains;
  *pctx = reinterpret_cast<CUcontext>(&d.contexts[dev]);
  return CUDA_SUCCESS;
}

// Rule: every retain is matched by a release ("the primary context ... will be
// released once the last retain is released", Primary Context Management);
// fakecuda_context_retains() lets tests check the count returns to zero.
CUresult CUDAAPI cuDevicePrimaryCtxRelease(CUdevice dev) {
  ENTER(cuDevicePrimaryCtxRelease)
  REQUIRE_INIT(cuDevicePrimaryCtxRelease)
  Driver& d = drv();
  if (dev < 0 || dev >= d.devices)
    return violation(CUDA_ERROR_INVALID_DEVICE, "cuDevicePrimaryCtxRelease", "no device %d", dev);
  // The manual: CUDA_ERROR_INVALID_CONTEXT when the primary context is not retained.
  if (d.contexts[dev].retains == 0)
    return violation(CUDA_ERROR_INVALID_CONTEXT, "cuDevicePrimaryCtxRelease", "device %d's primary context is not retained", dev);
  --d.contexts[dev].retains;
  return CUDA_SUCCESS;
}

CUresult CUDAAPI cuCtxGetCurrent(CUcontext* pctx) {
  ENTER(cuCtxGetCurrent)
  REQUIRE_INIT(cuCtxGetCurrent)
  if (!pctx) return violation(CUDA_ERROR_INVALID_VALUE, "cuCtxGetCurrent", "NULL output");
  *pctx = reinterpret_cast<CUcontext>(t_current);
  return CUDA_SUCCESS;
}

CUresult CUDAAPI cuCtxSetCurrent(CUcontext ctx) {
  ENTER(cuCtxSetCurrent)
  REQUIRE_INIT(cuCtxSetCurrent)
  Driver& d = drv();
  Context* c = reinterpret_cast<Context*>(ctx);
  if (c && (c < d.contexts.data() || c >= d.contexts.data() + d.contexts.size() || c->retains == 0))
    return violation(CUDA_ERROR_INVALID_CONTEXT, "cuCtxSetCurrent", "%p is not a live context", (void*)ctx);
  t_current = c;
  return CUDA_SUCCESS;
}

CUresult CUDAAPI cuMemGetAllocationGranularity(size_t* granularity, const CUmemAllocationProp* prop,
                                               CUmemAllocationGranularity_flags option) {
  ENTER(cuMemGetAllocationGranularity)
  REQUIRE_INIT(cuMemGetAllocationGranularity)
  Driver& d = drv();
  if (!granularity || !prop) return violation(CUDA_ERROR_INVALID_VALUE, "cuMemGetAllocationGranularity", "NULL argument");
  if (prop->type != CU_MEM_ALLOCATION_TYPE_PINNED || prop->location.type != CU_MEM_LOCATION_TYPE_DEVICE ||
      prop->location.id < 0 || prop->location.id >= d.devices)
    return violation(CUDA_ERROR_INVALID_VALUE, "cuMemGetAllocationGranularity", "allocation properties name no device of this machine");
  (void)option;  // minimum and recommended are the same here
  *granularity = d.granularity;
  return CUDA_SUCCESS;
}

// Rule (cuMemAddressReserve): "size - Size of the reserved virtual address
// range requested"; "alignment - Alignment of the reserved virtual address
// range requested"; size must be a multiple of the allocation granularity,
// and the alignment a power of two (CUDA_ERROR_INVALID_VALUE otherwise).
CUresult CUDAAPI cuMemAddressReserve(CUdeviceptr* ptr, size_t size, size_t alignment, CUdeviceptr addr,
                                     unsigned long long flags) {
  ENTER(cuMemAddressReserve)
  REQUIRE_CONTEXT(cuMemAddressReserve)
  Driver& d = drv();
  if (!ptr || size == 0 || !aligned(size))
    return violation(CUDA_ERROR_INVALID_VALUE, "cuMemAddressReserve", "size %zu is 0 or not a multiple of the granularity %zu", size, d.granularity);
  if (alignment & (alignment - 1))
    return violation(CUDA_ERROR_INVALID_VALUE, "cuMemAddressReserve", "alignment %zu is not a power of two", alignment);
  if (flags != 0) return violation(CUDA_ERROR_INVALID_VALUE, "cuMemAddressReserve", "flags must be 0");
  (void)addr;  // a hint only
  size_t align = std::max(alignment, d.granularity);
  // Over-reserve, then trim to the requested alignment.
  void* raw = mmap(nullptr, size + align, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (raw == MAP_FAILED) return CUDA_ERROR_OUT_OF_MEMORY;
  uintptr_t base = (reinterpret_cast<uintptr_t>(raw) + align - 1) / align * align;
  uintptr_t lead = base - reinterpret_cast<uintptr_t>(raw);
  if (lead) munmap(raw, lead);
  if (align - lead) munmap(reinterpret_cast<void*>(base + size), align - lead);
  d.reservations[base] = {size, 0};
  *ptr = static_cast<CUdeviceptr>(base);
  return CUDA_SUCCESS;
}

// Rule (cuMemAddressFree): "Frees a virtual address range reserved by
// cuMemAddressReserve. The size must match what was given to
// cuMemAddressReserve"; every mapping in it must be unmapped first (the
// manual's VA section: unmap, then free the reservation). The code for a
// reservation still mapped is not documented; CUDA_ERROR_INVALID_VALUE here.
CUresult CUDAAPI cuMemAddressFree(CUdeviceptr ptr, size_t size) {
  ENTER(cuMemAddressFree)
  REQUIRE_CONTEXT(cuMemAddressFree)
  Driver& d = drv();
  auto it = d.reservations.find(static_cast<uintptr_t>(ptr));
  if (it == d.reservations.end())
    return violation(CUDA_ERROR_INVALID_VALUE, "cuMemAddressFree", "%#llx is not the start of a reservation", ptr);
  if (it->second.bytes != size)
    return violation(CUDA_ERROR_INVALID_VALUE, "cuMemAddressFree", "size %zu differs from the reserved %zu", size, it->second.bytes);
  if (it->second.mapped_bytes)
    return violation(CUDA_ERROR_INVALID_VALUE, "cuMemAddressFree", "%zu bytes of the reservation are still mapped", it->second.mapped_bytes);
  munmap(reinterpret_cast<void*>(ptr), size);
  d.reservations.erase(it);
  return CUDA_SUCCESS;
}

// Rule (cuMemCreate): "size - Size allocation requested", a multiple of the
// granularity cuMemGetAllocationGranularity reports for `prop`
// (CUDA_ERROR_INVALID_VALUE); flags "for future use, must be zero";
// CUDA_ERROR_OUT_OF_MEMORY when the device is full.
CUresult CUDAAPI cuMemCreate(CUmemGenericAllocationHandle* handle, size_t size, const CUmemAllocationProp* prop,
                             unsigned long long flags) {
  ENTER(cuMemCreate)
  REQUIRE_CONTEXT(cuMemCreate)
  Driver& d = drv();
  if (!handle || !prop || flags != 0)
    return violation(CUDA_ERROR_INVALID_VALUE, "cuMemCreate", "NULL argument or non-zero flags");
  if (size == 0 || !aligned(size))
    return violation(CUDA_ERROR_INVALID_VALUE, "cuMemCreate", "size %zu is not a multiple of the granularity %zu", size, d.granularity);
  if (prop->type != CU_MEM_ALLOCATION_TYPE_PINNED || prop->location.type != CU_MEM_LOCATION_TYPE_DEVICE ||
      prop->location.id < 0 || prop->location.id >= d.devices)
    return violation(CUDA_ERROR_INVALID_VALUE, "cuMemCreate", "allocation properties name no device of this machine");
  if (d.used + size > d.total) return CUDA_ERROR_OUT_OF_MEMORY;  // not a misuse: the device is full
  off_t off;
  auto fit = d.free_offsets.find(size);
  if (fit != d.free_offsets.end() && !fit->second.empty()) {
    off = fit->second.back();
    fit->second.pop_back();
  } else {
    off = d.file_bytes;
    if (ftruncate(d.fd, d.file_bytes + static_cast<off_t>(size)) != 0) return CUDA_ERROR_OUT_OF_MEMORY;
    d.file_bytes += static_cast<off_t>(size);
  }
  CUmemGenericAllocationHandle h = d.next_handle;
  d.next_handle += 2;
  d.allocations[h] = Allocation{size, off};
  d.used += size;
  *handle = h;
  return CUDA_SUCCESS;
}

// Rule (cuMemRelease): releases the handle; "the memory allocation will be
// freed when all outstanding mappings to the memory are unmapped". The handle
// is gone at once: a second release, or a map of it, is CUDA_ERROR_INVALID_VALUE.
CUresult CUDAAPI cuMemRelease(CUmemGenericAllocationHandle handle) {
  ENTER(cuMemRelease)
  REQUIRE_CONTEXT(cuMemRelease)
  Driver& d = drv();
  auto it = d.allocations.find(handle);
  if (it == d.allocations.end() || it->second.released)
    return violation(CUDA_ERROR_INVALID_VALUE, "cuMemRelease", "handle %#llx is not a live allocation", handle);
  it->second.released = true;
  maybe_free(handle);
  return CUDA_SUCCESS;
}

// Rule (cuMemMap): "This range must be an address reservation previously
// reserved with cuMemAddressReserve, and offset + size must be less than the
// size of the memory allocation. Both ptr, size, and offset must be a multiple
// of the value given via cuMemGetAllocationGranularity"; flags "for future
// use, must be zero". Mapping over a range that is already mapped is refused
// (CUDA_ERROR_INVALID_VALUE); "calling cuMemMap does not make the address
// accessible": the pages stay PROT_NONE until cuMemSetAccess.
CUresult CUDAAPI cuMemMap(CUdeviceptr ptr, size_t size, size_t offset, CUmemGenericAllocationHandle handle,
                          unsigned long long flags) {
  ENTER(cuMemMap)
  REQUIRE_CONTEXT(cuMemMap)
  Driver& d = drv();
  uintptr_t va = static_cast<uintptr_t>(ptr);
  if (flags != 0) return violation(CUDA_ERROR_INVALID_VALUE, "cuMemMap", "flags must be 0");
  if (size == 0 || !aligned(va) || !aligned(size) || !aligned(offset))
    return violation(CUDA_ERROR_INVALID_VALUE, "cuMemMap", "address %#lx, size %zu or offset %zu not a multiple of the granularity %zu",
                     (unsigned long)va, size, offset, d.granularity);
  auto a = d.allocations.find(handle);
  if (a == d.allocations.end() || a->second.released)
    return violation(CUDA_ERROR_INVALID_VALUE, "cuMemMap", "handle %#llx is not a live allocation (never created, or released)", handle);
  if (offset + size > a->second.bytes)
    return violation(CUDA_ERROR_INVALID_VALUE, "cuMemMap", "offset %zu + size %zu exceeds the allocation's %zu bytes", offset, size, a->second.bytes);
  auto r = reservation_of(va, size);
  if (r == d.reservations.end())
    return violation(CUDA_ERROR_INVALID_VALUE, "cuMemMap", "[%#lx, +%zu) is not inside one reserved range", (unsigned long)va, size);
  auto next = d.mappings.lower_bound(va);
  bool overlaps = next != d.mappings.end() && next->first < va + size;
  if (!overlaps && next != d.mappings.begin()) {
    auto prev = std::prev(next);
    overlaps = prev->first + prev->second.bytes > va;
  }
  if (overlaps)
    return violation(CUDA_ERROR_INVALID_VALUE, "cuMemMap", "[%#lx, +%zu) is already mapped", (unsigned long)va, size);
  void* p = mmap(reinterpret_cast<void*>(va), size, PROT_NONE, MAP_FIXED | MAP_SHARED, d.fd,
                 a->second.offset + static_cast<off_t>(offset));
  if (p == MAP_FAILED) return CUDA_ERROR_OUT_OF_MEMORY;
  d.mappings[va] = {size, handle, 0};
  ++a->second.mappings;
  r->second.mapped_bytes += size;
  return CUDA_SUCCESS;
}

// Rule (cuMemUnmap): "The range must be the entire contiguous address range
// that was mapped to. In other words, cuMemUnmap cannot unmap a sub-range of
// an address range mapped by cuMemCreate / cuMemMap" (CUDA_ERROR_INVALID_VALUE).
// A range made of several whole mappings is accepted.
CUresult CUDAAPI cuMemUnmap(CUdeviceptr ptr, size_t size) {
  ENTER(cuMemUnmap)
  REQUIRE_CONTEXT(cuMemUnmap)
  Driver& d = drv();
  uintptr_t va = static_cast<uintptr_t>(ptr);
  if (size == 0 || !whole_mappings(va, size))
    return violation(CUDA_ERROR_INVALID_VALUE, "cuMemUnmap", "[%#lx, +%zu) is not a run of whole mappings", (unsigned long)va, size);
  auto r = reservation_of(va, size);
  for (uintptr_t a = va; a < va + size;) {
    auto it = d.mappings.find(a);
    size_t n = it->second.bytes;
    CUmemGenericAllocationHandle h = it->second.handle;
    mmap(reinterpret_cast<void*>(a), n, PROT_NONE, MAP_FIXED | MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    d.mappings.erase(it);
    --d.allocations[h].mappings;
    maybe_free(h);
    a += n;
  }
  r->second.mapped_bytes -= size;
  return CUDA_SUCCESS;
}

// Rule (cuMemSetAccess): "The range must be a fully mapped address range
// containing all allocations created by cuMemMap / cuMemCreate"
// (CUDA_ERROR_INVALID_VALUE). CU_MEM_ACCESS_FLAGS_PROT_READ makes it
// read-only (a write faults), PROT_READWRITE readable and writable, PROT_NONE
// (the state after cuMemMap) inaccessible.
CUresult CUDAAPI cuMemSetAccess(CUdeviceptr ptr, size_t size, const CUmemAccessDesc* desc, size_t count) {
  ENTER(cuMemSetAccess)
  REQUIRE_CONTEXT(cuMemSetAccess)
  Driver& d = drv();
  uintptr_t va = static_cast<uintptr_t>(ptr);
  if (!desc || count == 0) return violation(CUDA_ERROR_INVALID_VALUE, "cuMemSetAccess", "no access descriptor");
  if (size == 0 || !whole_mappings(va, size))
    return violation(CUDA_ERROR_INVALID_VALUE, "cuMemSetAccess", "[%#lx, +%zu) is not a fully mapped run of whole mappings", (unsigned long)va, size);
  int prot = -1;
  for (size_t i = 0; i < count; ++i) {
    if (desc[i].location.type != CU_MEM_LOCATION_TYPE_DEVICE || desc[i].location.id < 0 || desc[i].location.id >= d.devices)
      return violation(CUDA_ERROR_INVALID_VALUE, "cuMemSetAccess", "descriptor %zu names no device of this machine", i);
    switch (desc[i].flags) {
      case CU_MEM_ACCESS_FLAGS_PROT_NONE: prot = std::max(prot, PROT_NONE); break;
      case CU_MEM_ACCESS_FLAGS_PROT_READ: prot = std::max(prot, PROT_READ); break;
      case CU_MEM_ACCESS_FLAGS_PROT_READWRITE: prot = PROT_READ | PROT_WRITE; break;
      default: return violation(CUDA_ERROR_INVALID_VALUE, "cuMemSetAccess", "unknown access flags %d", (int)desc[i].flags);
    }
  }
  if (mprotect(reinterpret_cast<void*>(va), size, prot) != 0) return CUDA_ERROR_OUT_OF_MEMORY;
  for (uintptr_t a = va; a < va + size;) {
    Mapping& m = d.mappings[a];
    m.access = prot;
    a += m.bytes;
  }
  return CUDA_SUCCESS;
}

CUresult CUDAAPI cuMemGetInfo(size_t* free_bytes, size_t* total_bytes) {
  ENTER(cuMemGetInfo)
  REQUIRE_CONTEXT(cuMemGetInfo)
  Driver& d = drv();
  if (!free_bytes || !total_bytes) return violation(CUDA_ERROR_INVALID_VALUE, "cuMemGetInfo", "NULL output");
  *total_bytes = d.total;
  *free_bytes = d.total - d.used;
  return CUDA_SUCCESS;
}

// Copies run at once (the fake has no copy engine); their stream must be
// valid and the device side mapped with access, as a kernel would need.
// Rule: an address range the driver does not know is CUDA_ERROR_INVALID_VALUE
// (cuMemcpy*: "CUDA_ERROR_INVALID_VALUE").
CUresult CUDAAPI cuMemcpyDtoHAsync(void* dst, CUdeviceptr src, size_t bytes, CUstream stream) {
  ENTER(cuMemcpyDtoHAsync)
  REQUIRE_CONTEXT(cuMemcpyDtoHAsync)
  if (!need_stream("cuMemcpyDtoHAsync", stream, &fake_rc)) return fake_rc;
  if (!dst || !accessible(static_cast<uintptr_t>(src), bytes, PROT_READ))
    return violation(CUDA_ERROR_INVALID_VALUE, "cuMemcpyDtoHAsync", "source [%#llx, +%zu) is not mapped readable", src, bytes);
  memcpy(dst, reinterpret_cast<const void*>(src), bytes);
  return CUDA_SUCCESS;
}

CUresult CUDAAPI cuMemcpyHtoDAsync(CUdeviceptr dst, const void* src, size_t bytes, CUstream stream) {
  ENTER(cuMemcpyHtoDAsync)
  REQUIRE_CONTEXT(cuMemcpyHtoDAsync)
  if (!need_stream("cuMemcpyHtoDAsync", stream, &fake_rc)) return fake_rc;
  if (!src || !accessible(static_cast<uintptr_t>(dst), bytes, PROT_READ | PROT_WRITE))
    return violation(CUDA_ERROR_INVALID_VALUE, "cuMemcpyHtoDAsync", "destination [%#llx, +%zu) is not mapped writable", dst, bytes);
  memcpy(reinterpret_cast<void*>(dst), src, bytes);
  return CUDA_SUCCESS;
}

CUresult CUDAAPI cuStreamCreate(CUstream* stream, unsigned int flags) {
  ENTER(cuStreamCreate)
  REQUIRE_CONTEXT(cuStreamCreate)
  if (!stream || (flags & ~unsigned(CU_STREAM_NON_BLOCKING)))
    return violation(CUDA_ERROR_INVALID_VALUE, "cuStreamCreate", "NULL output or unknown flags %u", flags);
  CUstream s = reinterpret_cast<CUstream>(new char);  // a unique address as the handle
  drv().created_streams.insert(s);
  drv().streams[s] = {};
  *stream = s;
  return CUDA_SUCCESS;
}

// Rule (cuStreamDestroy): only streams made by cuStreamCreate (not 0, the
// legacy or the per-thread stream) are destroyed (CUDA_ERROR_INVALID_HANDLE).
CUresult CUDAAPI cuStreamDestroy(CUstream stream) {
  ENTER(cuStreamDestroy)
  REQUIRE_CONTEXT(cuStreamDestroy)
  Driver& d = drv();
  if (!d.created_streams.count(stream))
    return violation(CUDA_ERROR_INVALID_HANDLE, "cuStreamDestroy", "stream %p was not made by cuStreamCreate", (void*)stream);
  d.created_streams.erase(stream);
  d.streams.erase(stream);
  delete reinterpret_cast<char*>(stream);
  return CUDA_SUCCESS;
}

CUresult CUDAAPI cuStreamSynchronize(CUstream stream) {
  ENTER(cuStreamSynchronize)
  REQUIRE_CONTEXT(cuStreamSynchronize)
  if (!need_stream("cuStreamSynchronize", stream, &fake_rc)) return fake_rc;
  Stream& s = drv().streams[stream];
  s.completed = s.recorded;  // a host wait completes the work it waits for
  return CUDA_SUCCESS;
}

// Rule (cuStreamWaitEvent): "flags - must be 0" (or CU_EVENT_WAIT_DEFAULT);
// an event that was never recorded makes the call a no-op.
CUresult CUDAAPI cuStreamWaitEvent(CUstream stream, CUevent event, unsigned int flags) {
  ENTER(cuStreamWaitEvent)
  REQUIRE_CONTEXT(cuStreamWaitEvent)
  if (!need_stream("cuStreamWaitEvent", stream, &fake_rc)) return fake_rc;
  if (!need_event("cuStreamWaitEvent", event, &fake_rc)) return fake_rc;
  if (flags != 0) return violation(CUDA_ERROR_INVALID_VALUE, "cuStreamWaitEvent", "flags must be 0");
  return CUDA_SUCCESS;
}

CUresult CUDAAPI cuEventCreate(CUevent* event, unsigned int flags) {
  ENTER(cuEventCreate)
  REQUIRE_CONTEXT(cuEventCreate)
  if (!event) return violation(CUDA_ERROR_INVALID_VALUE, "cuEventCreate", "NULL output");
  (void)flags;
  Event* e = new Event;
  drv().events.insert(reinterpret_cast<CUevent>(e));
  *event = reinterpret_cast<CUevent>(e);
  return CUDA_SUCCESS;
}

// Rule (cuEventRecord): "hEvent and hStream must be from the same context";
// both valid handles (CUDA_ERROR_INVALID_HANDLE). The event completes when the
// stream's earlier work does: at once, unless a test holds the stream.
CUresult CUDAAPI cuEventRecord(CUevent event, CUstream stream) {
  ENTER(cuEventRecord)
  REQUIRE_CONTEXT(cuEventRecord)
  if (!need_event("cuEventRecord", event, &fake_rc)) return fake_rc;
  if (!need_stream("cuEventRecord", stream, &fake_rc)) return fake_rc;
  Stream& s = drv().streams[stream];
  Event* e = reinterpret_cast<Event*>(event);
  e->stream = stream;
  e->seq = ++s.recorded;
  e->recorded = true;
  if (!s.held) s.completed = s.recorded;
  return CUDA_SUCCESS;
}

// Rule (cuEventQuery): CUDA_SUCCESS when the captured work is done, or "if
// cuEventRecord() has not been called on this event"; CUDA_ERROR_NOT_READY
// otherwise (not an error).
CUresult CUDAAPI cuEventQuery(CUevent event) {
  ENTER(cuEventQuery)
  REQUIRE_CONTEXT(cuEventQuery)
  if (!need_event("cuEventQuery", event, &fake_rc)) return fake_rc;
  Event* e = reinterpret_cast<Event*>(event);
  if (!e->recorded) return CUDA_SUCCESS;
  auto it = drv().streams.find(e->stream);
  if (it == drv().streams.end()) return CUDA_SUCCESS;  // stream destroyed: its work has drained
  return it->second.completed >= e->seq ? CUDA_SUCCESS : CUDA_ERROR_NOT_READY;
}

CUresult CUDAAPI cuEventSynchronize(CUevent event) {
  ENTER(cuEventSynchronize)
  REQUIRE_CONTEXT(cuEventSynchronize)
  if (!need_event("cuEventSynchronize", event, &fake_rc)) return fake_rc;
  Event* e = reinterpret_cast<Event*>(event);
  if (!e->recorded) return CUDA_SUCCESS;
  auto it = drv().streams.find(e->stream);
  if (it != drv().streams.end() && it->second.completed < e->seq) it->second.completed = e->seq;
  return CUDA_SUCCESS;
}

CUresult CUDAAPI cuEventDestroy(CUevent event) {
  ENTER(cuEventDestroy)
  REQUIRE_CONTEXT(cuEventDestroy)
  if (!need_event("cuEventDestroy", event, &fake_rc)) return fake_rc;
  drv().events.erase(event);
  delete reinterpret_cast<Event*>(event);
  return CUDA_SUCCESS;
}

// Pinned host memory (cuMemHostAlloc / cuMemFreeHost): plain pages here.
// Rule (cuMemFreeHost): "Frees the memory space pointed to by p, which must
// have been returned by a previous call to cuMemHostAlloc" (else
// CUDA_ERROR_INVALID_VALUE).
CUresult CUDAAPI cuMemHostAlloc(void** pp, size_t bytesize, unsigned int flags) {
  ENTER(cuMemHostAlloc)
  REQUIRE_CONTEXT(cuMemHostAlloc)
  constexpr unsigned kKnown = CU_MEMHOSTALLOC_PORTABLE | CU_MEMHOSTALLOC_DEVICEMAP | CU_MEMHOSTALLOC_WRITECOMBINED;
  if (!pp || bytesize == 0 || (flags & ~kKnown))
    return violation(CUDA_ERROR_INVALID_VALUE, "cuMemHostAlloc", "NULL output, zero size or unknown flags %u", flags);
  void* p = mmap(nullptr, bytesize, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) return CUDA_ERROR_OUT_OF_MEMORY;
  drv().host_allocs[p] = bytesize;
  *pp = p;
  return CUDA_SUCCESS;
}

CUresult CUDAAPI cuMemFreeHost(void* p) {
  ENTER(cuMemFreeHost)
  REQUIRE_CONTEXT(cuMemFreeHost)
  auto it = drv().host_allocs.find(p);
  if (it == drv().host_allocs.end())
    return violation(CUDA_ERROR_INVALID_VALUE, "cuMemFreeHost", "%p was not returned by cuMemHostAlloc", p);
  munmap(p, it->second);
  drv().host_allocs.erase(it);
  return CUDA_SUCCESS;
}

CUresult CUDAAPI cuGetErrorString(CUresult error, const char** pStr) {
  g_calls[k_cuGetErrorString].fetch_add(1, std::memory_order_relaxed);
  if (!pStr) return CUDA_ERROR_INVALID_VALUE;
  *pStr = code_name(error);
  return CUDA_SUCCESS;
}

// The CUDA 12/13 signature. Base names resolve to the definitions above (for
// the _v2-mapped names, the _v2 symbol, as the real driver does for
// cudaVersion >= 12000); unknown names are CUDA_ERROR_NOT_FOUND with
// CU_GET_PROC_ADDRESS_SYMBOL_NOT_FOUND.
CUresult CUDAAPI cuGetProcAddress_v2(const char* symbol, void** pfn, int cudaVersion, cuuint64_t flags,
                                     CUdriverProcAddressQueryResult* symbolStatus) {
  (void)flags;
  if (!symbol || !pfn) return CUDA_ERROR_INVALID_VALUE;
  struct Named {
    const char* name;
    void* fn;
  };
  static const Named table[] = {
#define FAKE_ADDR(name) {#name, reinterpret_cast<void*>(&::name)},
      FAKECUDA_ENTRY_POINTS(FAKE_ADDR)
#undef FAKE_ADDR
  };
  *pfn = nullptr;
  if (cudaVersion < 12000) {  // the backend asks for the 12.0 ABI; older asks are not served
    if (symbolStatus) *symbolStatus = CU_GET_PROC_ADDRESS_VERSION_NOT_SUFFICIENT;
    return CUDA_ERROR_NOT_FOUND;
  }
  for (const Named& n : table)
    if (strcmp(n.name, symbol) == 0) {
      *pfn = n.fn;
      if (symbolStatus) *symbolStatus = CU_GET_PROC_ADDRESS_SUCCESS;
      return CUDA_SUCCESS;
    }
  if (symbolStatus) *symbolStatus = CU_GET_PROC_ADDRESS_SYMBOL_NOT_FOUND;
  return CUDA_ERROR_NOT_FOUND;
}

}  // extern "C"

// ---- test controls ----------------------------------------------------------

FAKE_EXPORT int fakecuda_entry_count(void) { return kEntries; }
FAKE_EXPORT const char* fakecuda_entry_name(int i) { return i >= 0 && i < kEntries ? kEntryNames[i] : ""; }
// Calls of entry point `name` so far (base name, e.g. "cuMemMap"); -1 if unknown.
FAKE_EXPORT int64_t fakecuda_calls(const char* name) {
  for (int i = 0; i < kEntries; ++i)
    if (strcmp(kEntryNames[i], name) == 0) return static_cast<int64_t>(g_calls[i].load());
  return -1;
}
// Calls of every entry point so far.
FAKE_EXPORT uint64_t fakecuda_total_calls(void) {
  uint64_t n = 0;
  for (auto& c : g_calls) n += c.load();
  return n;
}

FAKE_EXPORT void fakecuda_hold_stream(uintptr_t stream) {
  std::lock_guard<std::mutex> g(drv().mu);
  drv().streams[reinterpret_cast<CUstream>(stream)].held = true;
}
FAKE_EXPORT void fakecuda_release_stream(uintptr_t stream) {
  std::lock_guard<std::mutex> g(drv().mu);
  Stream& s = drv().streams[reinterpret_cast<CUstream>(stream)];
  s.held = false;
  s.completed = s.recorded;
}
FAKE_EXPORT void fakecuda_set_foreign_streams(int on) {
  std::lock_guard<std::mutex> g(drv().mu);
  drv().foreign_streams = on != 0;
}
// The nth next call of `name` returns `code` (n = 1: the very next; 0 disarms).
FAKE_EXPORT int fakecuda_fail_call(const char* name, int64_t nth, int code) {
  std::lock_guard<std::mutex> g(drv().mu);
  for (int i = 0; i < kEntries; ++i)
    if (strcmp(kEntryNames[i], name) == 0) {
      drv().fail_countdown[i] = nth;
      drv().fail_code[i] = static_cast<CUresult>(code);
      return 0;
    }
  return -1;
}
FAKE_EXPORT const char* fakecuda_last_violation(void) {
  static thread_local std::string copy;
  std::lock_guard<std::mutex> g(drv().mu);
  copy = drv().last_violation;
  return copy.c_str();
}
FAKE_EXPORT uint64_t fakecuda_violations(void) {
  std::lock_guard<std::mutex> g(drv().mu);
  return drv().violations;
}
FAKE_EXPORT void fakecuda_set_quiet(int on) {
  std::lock_guard<std::mutex> g(drv().mu);
  drv().quiet = on != 0;
}
// What the driver still holds: live handles, mappings, reservations, events,
// created streams, pinned host allocations, primary-context retains.
FAKE_EXPORT void fakecuda_live(uint64_t out[7]) {
  std::lock_guard<std::mutex> g(drv().mu);
  Driver& d = drv();
  uint64_t retains = 0;
  for (auto& c : d.contexts) retains += c.retains;
  out[0] = d.allocations.size();
  out[1] = d.mappings.size();
  out[2] = d.reservations.size();
  out[3] = d.events.size();
  out[4] = d.created_streams.size();
  out[5] = d.host_allocs.size();
  out[6] = retains;
}
// Access flags of the mapping at `va` (0 none, 1 read, 3 read/write), -1 if unmapped.
FAKE_EXPORT int fakecuda_access(uintptr_t va) {
  std::lock_guard<std::mutex> g(drv().mu);
  auto it = drv().mappings.upper_bound(va);
  if (it == drv().mappings.begin()) return -1;
  --it;
  if (va >= it->first + it->second.bytes) return -1;
  return it->second.access;
}
// Makes the calling thread have no current context (a fresh thread's state).
FAKE_EXPORT void fakecuda_clear_current(void) { t_current = nullptr; }

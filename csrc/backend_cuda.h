// backend_cuda.h: the CUDA driver VMM backend.
//
// libcuda.so.1 is opened with dlopen and every entry point is resolved with
// cuGetProcAddress, so the library links nothing from CUDA and loads on
// machines without a driver (the host backend still works there). This file
// stays thin on purpose: all decisions live in the pool and the arena, which
// the host backend exercises on every machine.
//
// Which library: ELLM_ALLOC_LIBCUDA, when set, names the driver library to
// load instead of libcuda.so.1 (a path, or a name dlopen searches for). The
// test suite points it at tests/fakecuda/, a strict fake driver over host
// memory, so this file runs in CI on machines without a GPU.
//
// Context: every call that touches the driver runs inside a Bound scope (below), which makes
// the device's primary context current in a thread that has none (torch's
// threads usually have one; a reclaim from another owner's thread, a pool
// made before torch touched the device, or a Python thread may not).
//
// Compiled only when cuda.h is available at build time (ELLM_HAVE_CUDA_H).
#pragma once

#if defined(ELLM_HAVE_CUDA_H)

#include <cuda.h>
#include <dlfcn.h>
#include <cstdlib>
#include <mutex>
#include <string>
#include <vector>

#include "backend.h"

namespace ellm {

// Entry points, typed from cuda.h itself.
struct CudaDriver {
#define ELLM_CU_FN(name) decltype(&::name) name = nullptr;
  ELLM_CU_FN(cuInit)
  ELLM_CU_FN(cuDeviceGetCount)
  ELLM_CU_FN(cuDeviceGet)
  ELLM_CU_FN(cuDevicePrimaryCtxRetain)
  ELLM_CU_FN(cuDevicePrimaryCtxRelease)
  ELLM_CU_FN(cuCtxGetCurrent)
  ELLM_CU_FN(cuCtxSetCurrent)
  ELLM_CU_FN(cuMemGetAllocationGranularity)
  ELLM_CU_FN(cuMemAddressReserve)
  ELLM_CU_FN(cuMemAddressFree)
  ELLM_CU_FN(cuMemCreate)
  ELLM_CU_FN(cuMemRelease)
  ELLM_CU_FN(cuMemMap)
  ELLM_CU_FN(cuMemUnmap)
  ELLM_CU_FN(cuMemSetAccess)
  ELLM_CU_FN(cuMemGetInfo)
  ELLM_CU_FN(cuMemcpyDtoHAsync)
  ELLM_CU_FN(cuMemcpyHtoDAsync)
  ELLM_CU_FN(cuStreamSynchronize)
  ELLM_CU_FN(cuStreamCreate)
  ELLM_CU_FN(cuStreamDestroy)
  ELLM_CU_FN(cuStreamWaitEvent)
  ELLM_CU_FN(cuMemHostAlloc)
  ELLM_CU_FN(cuMemFreeHost)
  ELLM_CU_FN(cuEventCreate)
  ELLM_CU_FN(cuEventRecord)
  ELLM_CU_FN(cuEventQuery)
  ELLM_CU_FN(cuEventSynchronize)
  ELLM_CU_FN(cuEventDestroy)
  ELLM_CU_FN(cuGetErrorString)
#undef ELLM_CU_FN

  std::string error;  // why loading failed, empty when it worked

  // Loads the driver once per process. Returns nullptr (with `error` set in
  // the returned-on-failure static) when there is no usable driver.
  static CudaDriver* get(std::string* why) {
    static CudaDriver drv;
    static std::once_flag once;
    std::call_once(once, [] { drv.load(); });
    if (!drv.error.empty()) {
      *why = drv.error;
      return nullptr;
    }
    return &drv;
  }

 private:
  void load() {
    const char* override_path = std::getenv("ELLM_ALLOC_LIBCUDA");
    std::string path = override_path && *override_path ? override_path : "libcuda.so.1";
    void* lib = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (!lib) {
      error = "cannot load " + path + " (no NVIDIA driver?): " + dlerror();
      return;
    }
    using GetProc = CUresult (*)(const char*, void**, int, cuuint64_t, CUdriverProcAddressQueryResult*);
    auto get_proc = reinterpret_cast<GetProc>(dlsym(lib, "cuGetProcAddress_v2"));
    if (!get_proc) {
      error = path + " has no cuGetProcAddress_v2 (driver older than CUDA 12)";
      return;
    }
    // Ask for the CUDA 12.0 ABI of each symbol: the VMM and event calls we use
    // have kept that signature, and every driver since 12.0 provides it.
    bool ok = true;
    auto resolve = [&](const char* sym, void** fn) {
      CUdriverProcAddressQueryResult q;
      if (get_proc(sym, fn, 12000, CU_GET_PROC_ADDRESS_DEFAULT, &q) != CUDA_SUCCESS || !*fn) {
        error += std::string(error.empty() ? "" : ", ") + sym;
        ok = false;
      }
    };
#define ELLM_CU_RESOLVE(name) resolve(#name, reinterpret_cast<void**>(&name));
    ELLM_CU_RESOLVE(cuInit)
    ELLM_CU_RESOLVE(cuDeviceGetCount)
    ELLM_CU_RESOLVE(cuDeviceGet)
    ELLM_CU_RESOLVE(cuDevicePrimaryCtxRetain)
    ELLM_CU_RESOLVE(cuDevicePrimaryCtxRelease)
    ELLM_CU_RESOLVE(cuCtxGetCurrent)
    ELLM_CU_RESOLVE(cuCtxSetCurrent)
    ELLM_CU_RESOLVE(cuMemGetAllocationGranularity)
    ELLM_CU_RESOLVE(cuMemAddressReserve)
    ELLM_CU_RESOLVE(cuMemAddressFree)
    ELLM_CU_RESOLVE(cuMemCreate)
    ELLM_CU_RESOLVE(cuMemRelease)
    ELLM_CU_RESOLVE(cuMemMap)
    ELLM_CU_RESOLVE(cuMemUnmap)
    ELLM_CU_RESOLVE(cuMemSetAccess)
    ELLM_CU_RESOLVE(cuMemGetInfo)
    ELLM_CU_RESOLVE(cuMemcpyDtoHAsync)
    ELLM_CU_RESOLVE(cuMemcpyHtoDAsync)
    ELLM_CU_RESOLVE(cuStreamSynchronize)
    ELLM_CU_RESOLVE(cuStreamCreate)
    ELLM_CU_RESOLVE(cuStreamDestroy)
    ELLM_CU_RESOLVE(cuStreamWaitEvent)
    ELLM_CU_RESOLVE(cuMemHostAlloc)
    ELLM_CU_RESOLVE(cuMemFreeHost)
    ELLM_CU_RESOLVE(cuEventCreate)
    ELLM_CU_RESOLVE(cuEventRecord)
    ELLM_CU_RESOLVE(cuEventQuery)
    ELLM_CU_RESOLVE(cuEventSynchronize)
    ELLM_CU_RESOLVE(cuEventDestroy)
    ELLM_CU_RESOLVE(cuGetErrorString)
#undef ELLM_CU_RESOLVE
    if (!ok) {
      error = path + " lacks: " + error;
      return;
    }
    if (cuInit(0) != CUDA_SUCCESS) error = "cuInit failed: no usable CUDA device";
  }
};

class CudaBackend final : public Backend {
 public:
  // Fails (ok() == false, why() set) when there is no driver or device.
  explicit CudaBackend(int device) : device_(device) {
    drv_ = CudaDriver::get(&why_);
    if (!drv_) return;
    // A device index that does not exist is the caller's mistake: say so
    // plainly rather than pass it to cuDeviceGet.
    int count = 0;
    if (!check(drv_->cuDeviceGetCount(&count), "cuDeviceGetCount")) return;
    if (device < 0 || device >= count) {
      why_ = "no CUDA device " + std::to_string(device) + " (this machine has " + std::to_string(count) + ")";
      return;
    }
    CUdevice dev;
    if (!check(drv_->cuDeviceGet(&dev, device), "cuDeviceGet")) return;
    if (!check(drv_->cuDevicePrimaryCtxRetain(&ctx_, dev), "cuDevicePrimaryCtxRetain")) return;
    dev_ = dev;
    retained_ = true;
    prop_.type = CU_MEM_ALLOCATION_TYPE_PINNED;
    prop_.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
    prop_.location.id = device;
    size_t g = 0;
    if (!check(drv_->cuMemGetAllocationGranularity(&g, &prop_, CU_MEM_ALLOC_GRANULARITY_MINIMUM),
               "cuMemGetAllocationGranularity"))
      return;
    granularity_ = g;
    access_.location = prop_.location;
    access_.flags = CU_MEM_ACCESS_FLAGS_PROT_READWRITE;
    ok_ = true;
  }
  ~CudaBackend() override {
    if (ok_) {
      Bound b(this);
      for (CUevent e : idle_events_) drv_->cuEventDestroy(e);
    }
    // Each retain is matched by one release; the context lives on while
    // torch (or another pool of this device) holds its own retain.
    if (retained_) drv_->cuDevicePrimaryCtxRelease(dev_);
  }
  bool ok() const { return ok_; }
  const std::string& why() const { return why_; }

  const char* name() const override { return "cuda"; }
  int device() const override { return device_; }
  size_t granularity() const override { return granularity_; }

  int reserve(size_t bytes, uintptr_t* va) override {
    Bound b(this);
    CUdeviceptr p = 0;
    if (!check(drv_->cuMemAddressReserve(&p, bytes, granularity_, 0, 0), "cuMemAddressReserve"))
      return kOutOfMemory;
    *va = static_cast<uintptr_t>(p);
    return kOk;
  }
  void release(uintptr_t va, size_t bytes) override {
    Bound b(this);
    check(drv_->cuMemAddressFree(static_cast<CUdeviceptr>(va), bytes), "cuMemAddressFree");
  }
  int create_chunk(size_t bytes, ChunkHandle* out) override {
    Bound b(this);
    CUmemGenericAllocationHandle h;
    CUresult r = drv_->cuMemCreate(&h, bytes, &prop_, 0);
    if (r == CUDA_ERROR_OUT_OF_MEMORY) return kOutOfMemory;
    if (!check(r, "cuMemCreate")) return kBackendError;
    *out = static_cast<ChunkHandle>(h);
    return kOk;
  }
  void destroy_chunk(ChunkHandle h, size_t) override {
    Bound b(this);
    check(drv_->cuMemRelease(static_cast<CUmemGenericAllocationHandle>(h)), "cuMemRelease");
  }
  int map(uintptr_t va, size_t bytes, ChunkHandle h) override {
    Bound b(this);
    CUresult r = drv_->cuMemMap(static_cast<CUdeviceptr>(va), bytes, 0, static_cast<CUmemGenericAllocationHandle>(h), 0);
    // The driver may run out of memory for page tables: the caller treats
    // that as out of memory (reclaim, then fail cleanly), not as a bug.
    if (r == CUDA_ERROR_OUT_OF_MEMORY) return kOutOfMemory;
    return check(r, "cuMemMap") ? kOk : kBackendError;
  }
  int set_access(uintptr_t va, size_t bytes) override {
    Bound b(this);
    return check(drv_->cuMemSetAccess(static_cast<CUdeviceptr>(va), bytes, &access_, 1), "cuMemSetAccess")
               ? kOk
               : kBackendError;
  }
  // Never run on a GPU yet (compiled only): the zero chunk's mappings. Each
  // chunk of the run is a cuMemMap of the same handle, then one
  // cuMemSetAccess grants read-only access (CU_MEM_ACCESS_FLAGS_PROT_READ), so
  // a kernel that writes there faults instead of writing anyone's memory.
  int map_read_only(uintptr_t va, size_t bytes, ChunkHandle h, size_t chunk) override {
    if (chunk == 0 || bytes == 0 || bytes % chunk) return kInvalidArgument;
    Bound b(this);
    for (uintptr_t a = va; a < va + bytes; a += chunk) {
      if (!check(drv_->cuMemMap(static_cast<CUdeviceptr>(a), chunk, 0,
                                static_cast<CUmemGenericAllocationHandle>(h), 0),
                 "cuMemMap (read-only)")) {
        for (uintptr_t b = va; b < a; b += chunk) drv_->cuMemUnmap(static_cast<CUdeviceptr>(b), chunk);
        return kBackendError;
      }
    }
    CUmemAccessDesc read_only = access_;
    read_only.flags = CU_MEM_ACCESS_FLAGS_PROT_READ;
    if (!check(drv_->cuMemSetAccess(static_cast<CUdeviceptr>(va), bytes, &read_only, 1),
               "cuMemSetAccess (read-only)")) {
      for (uintptr_t a = va; a < va + bytes; a += chunk) drv_->cuMemUnmap(static_cast<CUdeviceptr>(a), chunk);
      return kBackendError;
    }
    return kOk;
  }
  int unmap(uintptr_t va, size_t bytes) override {
    Bound b(this);
    return check(drv_->cuMemUnmap(static_cast<CUdeviceptr>(va), bytes), "cuMemUnmap") ? kOk : kBackendError;
  }
  int copy_to_host(void* dst, uintptr_t src, size_t bytes, StreamId stream) override {
    Bound b(this);
    return check(drv_->cuMemcpyDtoHAsync(dst, static_cast<CUdeviceptr>(src), bytes,
                                         reinterpret_cast<CUstream>(stream)),
                 "cuMemcpyDtoHAsync")
               ? kOk
               : kBackendError;
  }
  int copy_from_host(uintptr_t dst, const void* src, size_t bytes, StreamId stream) override {
    Bound b(this);
    return check(drv_->cuMemcpyHtoDAsync(static_cast<CUdeviceptr>(dst), src, bytes,
                                         reinterpret_cast<CUstream>(stream)),
                 "cuMemcpyHtoDAsync")
               ? kOk
               : kBackendError;
  }
  // Never run on a GPU yet (compiled, and run on tests/fakecuda only): the
  // host tier's pinned slabs and the swap stream. Portable pinned memory, so
  // a context of any device may copy from it.
  int host_alloc(size_t bytes, void** out) override {
    Bound b(this);
    CUresult r = drv_->cuMemHostAlloc(out, bytes, CU_MEMHOSTALLOC_PORTABLE);
    if (r == CUDA_ERROR_OUT_OF_MEMORY) return check(r, "cuMemHostAlloc"), kOutOfMemory;
    return check(r, "cuMemHostAlloc") ? kOk : kBackendError;
  }
  void host_free(void* p, size_t) override {
    Bound b(this);
    check(drv_->cuMemFreeHost(p), "cuMemFreeHost");
  }
  // Non-blocking: swap copies must not wait for (or hold up) the legacy
  // default stream; their order with compute is set by events alone.
  int stream_create(StreamId* out) override {
    Bound b(this);
    CUstream s = nullptr;
    if (!check(drv_->cuStreamCreate(&s, CU_STREAM_NON_BLOCKING), "cuStreamCreate")) return kBackendError;
    *out = reinterpret_cast<StreamId>(s);
    return kOk;
  }
  void stream_destroy(StreamId s) override {
    Bound b(this);
    check(drv_->cuStreamDestroy(reinterpret_cast<CUstream>(s)), "cuStreamDestroy");
  }
  int stream_wait_event(StreamId s, EventHandle e) override {
    Bound b(this);
    return check(drv_->cuStreamWaitEvent(reinterpret_cast<CUstream>(s), reinterpret_cast<CUevent>(e), 0),
                 "cuStreamWaitEvent")
               ? kOk
               : kBackendError;
  }
  int mem_info(size_t* free_bytes, size_t* total_bytes) override {
    Bound b(this);
    return check(drv_->cuMemGetInfo(free_bytes, total_bytes), "cuMemGetInfo") ? kOk : kBackendError;
  }

  int event_record(StreamId stream, EventHandle* out) override {
    Bound b(this);
    CUevent e = nullptr;
    {
      std::lock_guard<std::mutex> g(mu_);
      if (!idle_events_.empty()) {
        e = idle_events_.back();
        idle_events_.pop_back();
      }
    }
    if (!e && !check(drv_->cuEventCreate(&e, CU_EVENT_DISABLE_TIMING), "cuEventCreate"))
      return kBackendError;
    if (!check(drv_->cuEventRecord(e, reinterpret_cast<CUstream>(stream)), "cuEventRecord")) {
      std::lock_guard<std::mutex> g(mu_);
      idle_events_.push_back(e);  // still a good event: keep it, do not leak it
      return kBackendError;
    }
    *out = reinterpret_cast<EventHandle>(e);
    return kOk;
  }
  bool event_done(EventHandle e) override {
    Bound b(this);
    return drv_->cuEventQuery(reinterpret_cast<CUevent>(e)) != CUDA_ERROR_NOT_READY;
  }
  void event_wait(EventHandle e) override {
    Bound b(this);
    check(drv_->cuEventSynchronize(reinterpret_cast<CUevent>(e)), "cuEventSynchronize");
  }
  void event_destroy(EventHandle e) override {
    std::lock_guard<std::mutex> g(mu_);
    idle_events_.push_back(reinterpret_cast<CUevent>(e));
  }

 private:
  // Makes this device's primary context current for the scope of one
  // backend call. A thread with no context keeps it afterwards (as the CUDA
  // runtime's threads do); a thread with another device's context current
  // (torch freeing a tensor of device 1 while device 0 is current) gets its
  // own context back at the end, so our calls never act in, or leave behind,
  // the wrong context: events and streams of one context must not mix.
  struct Bound {
    CudaBackend* be;
    CUcontext restore = nullptr;
    explicit Bound(CudaBackend* b) : be(b) {
      CUcontext cur = nullptr;
      if (be->drv_->cuCtxGetCurrent(&cur) != CUDA_SUCCESS || cur == be->ctx_) return;
      if (be->drv_->cuCtxSetCurrent(be->ctx_) == CUDA_SUCCESS) restore = cur;
    }
    ~Bound() {
      if (restore) be->drv_->cuCtxSetCurrent(restore);
    }
    Bound(const Bound&) = delete;
    Bound& operator=(const Bound&) = delete;
  };

  // The message of the last failed call, for the error the pool reports. A
  // backend serves many threads: why_ is guarded by its own mutex.
  bool check(CUresult r, const char* what) {
    if (r == CUDA_SUCCESS) return true;
    const char* s = nullptr;
    if (drv_ && drv_->cuGetErrorString) drv_->cuGetErrorString(r, &s);
    std::lock_guard<std::mutex> g(why_mu_);
    why_ = std::string(what) + ": " + (s ? s : "unknown CUDA error");
    return false;
  }

  int device_;
  CUdevice dev_ = 0;
  bool ok_ = false, retained_ = false;
  std::mutex why_mu_;
  std::string why_;
  CudaDriver* drv_ = nullptr;
  CUcontext ctx_ = nullptr;
  CUmemAllocationProp prop_ = {};
  CUmemAccessDesc access_ = {};
  size_t granularity_ = 0;
  std::mutex mu_;
  std::vector<CUevent> idle_events_;
};

}  // namespace ellm

#endif  // ELLM_HAVE_CUDA_H

// dlpack_view.h: pool memory handed to torch as a DLPack tensor.
//
// Why DLPack and not __cuda_array_interface__: torch builds a tensor from the
// CUDA array interface with from_blob and no device, so it asks the driver
// which device owns the pointer (cudaPointerGetAttributes). A KV range is
// reserved VA whose first page may not be mapped yet, and the driver does not
// know such an address. DLPack carries the device itself, so torch never
// queries the pointer. The host pool takes the same path with kDLCPU, which
// keeps the CPU tests on the code the GPU runs.
//
// The structs are the DLPack 0.8 ABI (dlpack.h, the unversioned
// DLManagedTensor that every torch since 1.10 accepts in a "dltensor"
// capsule). Only a flat uint8 tensor is ever exported; callers view it.
#pragma once

#include <atomic>
#include <cstdint>
#include <cstdlib>

namespace ellm {

enum DLDeviceKind : int32_t { kDLCPU = 1, kDLCUDA = 2 };
enum DLTypeCode : uint8_t { kDLUInt = 1 };

struct DLDevice {
  int32_t device_type;
  int32_t device_id;
};
struct DLDataType {
  uint8_t code, bits;
  uint16_t lanes;
};
struct DLTensor {
  void* data;
  DLDevice device;
  int32_t ndim;
  DLDataType dtype;
  int64_t* shape;
  int64_t* strides;  // NULL = compact row-major
  uint64_t byte_offset;
};
struct DLManagedTensor {
  DLTensor dl_tensor;
  void* manager_ctx;
  void (*deleter)(DLManagedTensor* self);
};

// One allocation holds the struct and its shape; the consumer's deleter frees
// it. The memory itself stays the pool's: the view neither maps nor owns it.
struct ByteView {
  DLManagedTensor managed;
  int64_t shape[1];
};

// Descriptors handed out and not yet deleted: the tests check that every
// one comes back through its deleter.
inline std::atomic<int64_t> g_live_byte_views{0};

inline void free_byte_view(DLManagedTensor* self) {
  g_live_byte_views.fetch_sub(1, std::memory_order_relaxed);
  std::free(self);
}

inline DLManagedTensor* make_byte_view(uintptr_t addr, uint64_t nbytes, DLDeviceKind kind, int device) {
  auto* v = static_cast<ByteView*>(std::calloc(1, sizeof(ByteView)));
  if (!v) return nullptr;
  v->shape[0] = static_cast<int64_t>(nbytes);
  DLTensor& t = v->managed.dl_tensor;
  t.data = reinterpret_cast<void*>(addr);
  t.device = {kind, device};
  t.ndim = 1;
  t.dtype = {kDLUInt, 8, 1};
  t.shape = v->shape;
  v->managed.deleter = free_byte_view;
  g_live_byte_views.fetch_add(1, std::memory_order_relaxed);
  return &v->managed;
}

}  // namespace ellm

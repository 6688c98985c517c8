// backend.h: the only code that differs between a GPU and a CPU machine.
//
// A backend reserves virtual address ranges, creates physical chunks, maps and
// unmaps them, and orders work with streams and events. Two implementations:
// backend_cuda.h (driver VMM API, loaded with dlopen) and backend_host.h
// (memfd + mmap, with real addresses and a simulated stream timeline).
// Everything above this interface (pool, arena, KV) is shared.
#pragma once

#include <cstddef>
#include <cstdint>

namespace ellm {

using ChunkHandle = uint64_t;  // host: offset in the memfd; cuda: CUmemGenericAllocationHandle
using StreamId = uintptr_t;    // the cudaStream_t value torch passes; 0 is the default stream
using EventHandle = uint64_t;  // opaque; only the backend that made it may use it

// Error codes returned across the C API. 0 is success.
enum Status : int {
  kOk = 0,
  kOutOfMemory = 1,     // budget or device exhausted, even after reclaim
  kInvalidPointer = 2,  // free/record_stream of a pointer the arena does not own
  kDoubleFree = 3,      // free of a block that is already free
  kBackendError = 4,    // a driver or syscall failed (message in last_error)
  kInvalidArgument = 5,
  kForkedChild = 6,     // the allocator is unusable in a fork child
  kInjectedFault = 7,   // host fault injection fired
  kUnavailable = 8,     // backend cannot run here (no driver, no device)
};

// Where a pool's chunks come from: the device's memory (a Backend) or
// pinned host slabs (host_tier.h).
class ChunkSource {
 public:
  virtual ~ChunkSource() = default;
  virtual int create_chunk(size_t bytes, ChunkHandle* out) = 0;
  virtual void destroy_chunk(ChunkHandle h, size_t bytes) = 0;
};

class Backend : public ChunkSource {
 public:
  virtual const char* name() const = 0;
  virtual int device() const = 0;
  // Smallest size a chunk may have; chunk sizes are multiples of it.
  virtual size_t granularity() const = 0;

  virtual int reserve(size_t bytes, uintptr_t* va) = 0;
  virtual void release(uintptr_t va, size_t bytes) = 0;

  // map() backs [va, va+bytes) with chunk h. set_access() makes a run of
  // mapped chunks readable and writable; callers do it once per contiguous run
  // because on CUDA it costs ~20x a map. unmap() takes one mapped chunk.
  virtual int map(uintptr_t va, size_t bytes, ChunkHandle h) = 0;
  virtual int set_access(uintptr_t va, size_t bytes) = 0;
  virtual int unmap(uintptr_t va, size_t bytes) = 0;

  // Maps the one chunk h under every `chunk` bytes of [va, va+bytes), readable
  // and not writable, with one access grant for the run. Unlike map(), one
  // chunk may be mapped read-only at many places: the pool's zero chunk
  // (zero_chunk.h) under the unbacked pages of fixed-shape KV spaces. unmap()
  // takes each chunk off again. A backend without it cannot hold such spaces.
  virtual int map_read_only(uintptr_t va, size_t bytes, ChunkHandle h, size_t chunk) {
    (void)va, (void)bytes, (void)h, (void)chunk;
    return kUnavailable;
  }

  // Copies between pool memory and host memory, ordered on `stream`: on a
  // stream made by stream_create() they run asynchronously (KV swap); on
  // any other stream the host backend copies at once.
  virtual int copy_to_host(void* dst, uintptr_t src, size_t bytes, StreamId stream) = 0;
  virtual int copy_from_host(uintptr_t dst, const void* src, size_t bytes, StreamId stream) = 0;

  // Host memory for the host tier (host_tier.h): page-locked on CUDA, so
  // copies run asynchronously at full bus speed; on the host backend a memfd
  // of its own, so "device" and "host" bytes never share a file.
  virtual int host_alloc(size_t bytes, void** out) = 0;
  virtual void host_free(void* p, size_t bytes) = 0;

  // A stream of our own (KV swap copies run on one, beside compute), and
  // ordering across streams: work queued on `s` after this call runs after
  // the work before event `e`.
  virtual int stream_create(StreamId* out) = 0;
  virtual void stream_destroy(StreamId s) = 0;
  virtual int stream_wait_event(StreamId s, EventHandle e) = 0;

  virtual int mem_info(size_t* free_bytes, size_t* total_bytes) = 0;

  // Events: record one on a stream, ask whether the work before it is done,
  // or wait for it (a wait on one event, never a device-wide sync).
  virtual int event_record(StreamId stream, EventHandle* out) = 0;
  virtual bool event_done(EventHandle e) = 0;
  virtual void event_wait(EventHandle e) = 0;
  virtual void event_destroy(EventHandle e) = 0;
};

}  // namespace ellm

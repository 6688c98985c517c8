// backend_host.h: the host backend. A memfd file plays the device's physical
// memory and a chunk is an offset in it; reserving VA is mmap(PROT_NONE,
// MAP_NORESERVE); mapping is mmap(MAP_FIXED|MAP_SHARED) of the chunk's offset;
// unmapping puts PROT_NONE back. Addresses are real, so tests read and write
// through them, and touching unmapped VA faults as it does on a GPU.
//
// Streams are simulated: an event recorded on a stream is complete at once,
// unless a test has "held" that stream (GPU work still in flight). A wait on
// an event of a held stream completes the stream up to that event, which is
// what a real host-side wait does. This lets tests check that nothing is
// reused or unmapped while the (simulated) GPU may still touch it.
//
// Copy streams (stream_create) are real: each has a worker thread that runs
// its copies, its waits on other streams' events and its event records in
// order, so a swap's copy is truly asynchronous and the event protocol above
// it (kv_space.h) is exercised with real races. A host-side wait on an event
// of a copy stream waits for the worker; first it completes the simulated
// streams the worker waits on, as such a wait would on a GPU. On any other
// stream a copy runs at once, and stream_wait_event() waits on the host.
//
// Host memory (host_alloc) comes from a second memfd, mapped shared, so the
// host tier's bytes are told apart from the pool's "device" chunks.
//
// Stricter than the driver on purpose: mapping a VA that is mapped, or a chunk
// that is mapped elsewhere, fails. The ledger above must never ask for either.
// The one exception is map_read_only() (the pool's zero chunk): one chunk at
// many places, each mmap(PROT_READ, MAP_SHARED|MAP_FIXED) of its file range,
// so reads see its zeros and a write faults. A chunk is never mapped both
// ways at once: writes through one mapping would show through the others.
//
// fork(). Chunks are mapped MAP_SHARED from the memfd, and a forked child (a
// DataLoader worker, say) inherits those mappings: through them it could
// write into the parent's tensors. So every host backend of the process is
// listed, and the fork handlers below turn each of its mappings in the child
// into a MAP_PRIVATE mapping of the same file offset before the child runs:
//   * the child still reads the parent's data (the same file pages);
//   * its first write to a page copies that page, privately: the parent's
//     memory never changes through the child;
//   * a page the child has not written keeps showing the file, so it sees
//     later writes of the parent there (as with any MAP_PRIVATE file mapping).
// The prepare handler takes every backend's lock, so no map or unmap is half
// done when the child's copy of the table is read. The child never maps or
// creates chunks (the allocator is inert there: see allocator.cu).
#pragma once

#include <sys/mman.h>
#include <sys/sysinfo.h>
#include <unistd.h>
#include <fcntl.h>
#include <cerrno>
#include <cstring>
#include <algorithm>
#include <condition_variable>
#include <deque>
#include <memory>
#include <mutex>
#include <thread>
#include <unordered_map>
#include <vector>

#include "backend.h"

namespace ellm {

class HostBackend final : public Backend {
 public:
  static constexpr size_t kGranularity = 2u << 20;  // what the CUDA driver reports

  explicit HostBackend(int device) : device_(device) {
    fd_ = memfd_create("ellm_alloc_pool", MFD_CLOEXEC);
    host_fd_ = memfd_create("ellm_alloc_host_tier", MFD_CLOEXEC);
    std::lock_guard<std::mutex> g(registry().mu);
    registry().live.push_back(this);
  }
  ~HostBackend() override {
    {
      std::lock_guard<std::mutex> g(registry().mu);
      auto& v = registry().live;
      v.erase(std::remove(v.begin(), v.end(), this), v.end());
    }
    for (auto& [id, cs] : copy_streams_) stop_worker(cs.get());
    if (fd_ >= 0) close(fd_);
    if (host_fd_ >= 0) close(host_fd_);
  }
  bool ok() const { return fd_ >= 0 && host_fd_ >= 0; }

  const char* name() const override { return "host"; }
  int device() const override { return device_; }
  size_t granularity() const override { return kGranularity; }

  int reserve(size_t bytes, uintptr_t* va) override {
    void* p = mmap(nullptr, bytes, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) return kOutOfMemory;
    *va = reinterpret_cast<uintptr_t>(p);
    return kOk;
  }
  void release(uintptr_t va, size_t bytes) override {
    munmap(reinterpret_cast<void*>(va), bytes);
  }

  int create_chunk(size_t bytes, ChunkHandle* out) override {
    std::lock_guard<std::mutex> g(mu_);
    if (fire(&fail_create_countdown_)) return kInjectedFault;
    ChunkHandle off;
    auto it = free_offsets_.find(bytes);
    if (it != free_offsets_.end() && !it->second.empty()) {
      off = it->second.back();
      it->second.pop_back();
    } else {
      off = file_bytes_;
      if (ftruncate(fd_, static_cast<off_t>(file_bytes_ + bytes)) != 0) return kOutOfMemory;
      file_bytes_ += bytes;
    }
    *out = off;
    return kOk;
  }
  void destroy_chunk(ChunkHandle h, size_t bytes) override {
    std::lock_guard<std::mutex> g(mu_);
    // Give the memory back to the kernel but keep the offset for reuse.
    fallocate(fd_, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, static_cast<off_t>(h),
              static_cast<off_t>(bytes));
    free_offsets_[bytes].push_back(h);
  }

  int map(uintptr_t va, size_t bytes, ChunkHandle h) override {
    std::lock_guard<std::mutex> g(mu_);
    if (fire(&fail_map_countdown_)) return kInjectedFault;
    if (mapped_va_.count(va) || mapped_handle_.count(h) || read_only_maps_.count(h))
      return kBackendError;  // double map
    void* p = mmap(reinterpret_cast<void*>(va), bytes, PROT_NONE, MAP_FIXED | MAP_SHARED, fd_,
                   static_cast<off_t>(h));
    if (p == MAP_FAILED) return kBackendError;
    mapped_va_[va] = {h, bytes, false, false};
    mapped_handle_[h] = va;
    return kOk;
  }
  int map_read_only(uintptr_t va, size_t bytes, ChunkHandle h, size_t chunk) override {
    std::lock_guard<std::mutex> g(mu_);
    if (chunk == 0 || bytes == 0 || bytes % chunk) return kInvalidArgument;
    if (mapped_handle_.count(h)) return kBackendError;  // mapped writable somewhere
    for (uintptr_t a = va; a < va + bytes; a += chunk)
      if (mapped_va_.count(a)) return kBackendError;  // double map
    for (uintptr_t a = va; a < va + bytes; a += chunk) {
      void* p = mmap(reinterpret_cast<void*>(a), chunk, PROT_READ, MAP_FIXED | MAP_SHARED, fd_,
                     static_cast<off_t>(h));
      if (p == MAP_FAILED) {  // all or none: take back what this call mapped
        for (uintptr_t b = va; b < a; b += chunk) unmap_locked(b, chunk);
        return kBackendError;
      }
      mapped_va_[a] = {h, chunk, false, true};
      ++read_only_maps_[h];
    }
    return kOk;
  }
  int set_access(uintptr_t va, size_t bytes) override {
    std::lock_guard<std::mutex> g(mu_);
    if (mprotect(reinterpret_cast<void*>(va), bytes, PROT_READ | PROT_WRITE) != 0) return kBackendError;
    for (uintptr_t a = va; a < va + bytes;) {  // the run's mappings, for the fork handler
      auto it = mapped_va_.find(a);
      if (it == mapped_va_.end()) break;
      it->second.accessible = true;
      a += it->second.bytes;
    }
    return kOk;
  }
  int unmap(uintptr_t va, size_t bytes) override {
    std::lock_guard<std::mutex> g(mu_);
    return unmap_locked(va, bytes);
  }

  int copy_to_host(void* dst, uintptr_t src, size_t bytes, StreamId stream) override {
    return copy(dst, reinterpret_cast<const void*>(src), bytes, stream, /*into_new_mapping=*/false);
  }
  int copy_from_host(uintptr_t dst, const void* src, size_t bytes, StreamId stream) override {
    return copy(reinterpret_cast<void*>(dst), src, bytes, stream, /*into_new_mapping=*/true);
  }

  int host_alloc(size_t bytes, void** out) override {
    std::lock_guard<std::mutex> g(mu_);
    if (fire(&fail_host_alloc_countdown_)) return kInjectedFault;
    off_t off;
    auto it = free_host_offsets_.find(bytes);
    if (it != free_host_offsets_.end() && !it->second.empty()) {
      off = it->second.back();
      it->second.pop_back();
    } else {
      off = static_cast<off_t>(host_file_bytes_);
      if (ftruncate(host_fd_, static_cast<off_t>(host_file_bytes_ + bytes)) != 0) return kOutOfMemory;
      host_file_bytes_ += bytes;
    }
    // Not populated here: the first copy into a page faults it in on the copy
    // stream's worker, not in the caller of swap_out.
    void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, host_fd_, off);
    if (p == MAP_FAILED) {
      free_host_offsets_[bytes].push_back(off);
      return kOutOfMemory;
    }
    host_maps_[p] = off;
    *out = p;
    return kOk;
  }
  void host_free(void* p, size_t bytes) override {
    std::lock_guard<std::mutex> g(mu_);
    auto it = host_maps_.find(p);
    if (it == host_maps_.end()) return;
    munmap(p, bytes);
    fallocate(host_fd_, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, it->second, static_cast<off_t>(bytes));
    free_host_offsets_[bytes].push_back(it->second);
    host_maps_.erase(it);
  }
  size_t host_bytes_mapped() {
    std::lock_guard<std::mutex> g(mu_);
    return host_maps_.size();
  }

  int stream_create(StreamId* out) override {
    std::lock_guard<std::mutex> g(mu_);
    auto cs = std::make_unique<CopyStream>();
    CopyStream* raw = cs.get();
    StreamId id = reinterpret_cast<StreamId>(raw);  // a unique address: never a torch stream number
    copy_streams_[id] = std::move(cs);
    clocks_[id] = {};
    raw->worker = std::thread([this, id, raw] { run_worker(id, raw); });
    *out = id;
    return kOk;
  }
  void stream_destroy(StreamId s) override {
    std::unique_ptr<CopyStream> cs;
    {
      std::lock_guard<std::mutex> g(mu_);
      auto it = copy_streams_.find(s);
      if (it == copy_streams_.end()) return;
      cs = std::move(it->second);
      copy_streams_.erase(it);
    }
    stop_worker(cs.get());
  }
  int stream_wait_event(StreamId s, EventHandle e) override {
    std::unique_lock<std::mutex> g(mu_);
    HostEvent ev = events_[e - 1];
    auto it = copy_streams_.find(s);
    if (it == copy_streams_.end()) {  // a simulated stream is ordered by waiting here
      wait_locked(g, ev);
      return kOk;
    }
    it->second->queue.push_back({Task::kWait, nullptr, nullptr, 0, ev.stream, ev.seq});
    work_.notify_all();
    return kOk;
  }

  int mem_info(size_t* free_bytes, size_t* total_bytes) override {
    struct sysinfo si;
    if (sysinfo(&si) != 0) return kBackendError;
    *total_bytes = static_cast<size_t>(si.totalram) * si.mem_unit;
    *free_bytes = static_cast<size_t>(si.freeram + si.bufferram) * si.mem_unit;
    return kOk;
  }

  // Simulated stream timeline.
  int event_record(StreamId stream, EventHandle* out) override {
    std::lock_guard<std::mutex> g(mu_);
    StreamClock& c = clocks_[stream];
    uint64_t seq = ++c.recorded;
    auto cs = copy_streams_.find(stream);
    if (cs != copy_streams_.end()) {  // its worker completes it in order
      cs->second->queue.push_back({Task::kMark, nullptr, nullptr, 0, stream, seq});
      work_.notify_all();
    } else if (!c.held) {
      c.completed = seq;
    }
    if (free_events_.empty()) {
      events_.push_back({stream, seq});
      *out = events_.size();  // 1-based index
    } else {
      *out = free_events_.back();
      free_events_.pop_back();
      events_[*out - 1] = {stream, seq};
    }
    return kOk;
  }
  bool event_done(EventHandle e) override {
    std::lock_guard<std::mutex> g(mu_);
    const HostEvent& ev = events_[e - 1];
    return clocks_[ev.stream].completed >= ev.seq;
  }
  void event_wait(EventHandle e) override {
    std::unique_lock<std::mutex> g(mu_);
    wait_locked(g, events_[e - 1]);
  }
  void event_destroy(EventHandle e) override {
    std::lock_guard<std::mutex> g(mu_);
    free_events_.push_back(e);
  }

  // Test controls.
  void hold_stream(StreamId s) {
    std::lock_guard<std::mutex> g(mu_);
    clocks_[s].held = true;
  }
  void release_stream(StreamId s) {
    std::lock_guard<std::mutex> g(mu_);
    StreamClock& c = clocks_[s];
    c.held = false;
    c.completed = c.recorded;
    work_.notify_all();
  }
  // Waits until each copy stream's queue is empty or stuck behind a held
  // stream. Every batch of copies ends with an event mark, which wakes us.
  void drain_copies() {
    std::unique_lock<std::mutex> g(mu_);
    done_.wait(g, [&] {
      for (auto& [id, cs] : copy_streams_) {
        if (cs->queue.empty()) continue;
        const Task& t = cs->queue.front();
        if (t.kind == Task::kWait && clocks_[t.stream].held && clocks_[t.stream].completed < t.seq) continue;
        return false;
      }
      return true;
    });
  }
  // The nth next call of a kind fails (1 = the very next); 0 disarms.
  // Kinds: 0 chunk create, 1 map, 2 copy (either way), 3 host_alloc.
  int inject_fault(int kind, int64_t nth) {
    std::lock_guard<std::mutex> g(mu_);
    int64_t* countdown[] = {&fail_create_countdown_, &fail_map_countdown_, &fail_copy_countdown_,
                            &fail_host_alloc_countdown_};
    if (kind < 0 || kind > 3) return kInvalidArgument;
    *countdown[kind] = nth;
    return kOk;
  }
  size_t mapped_count() {
    std::lock_guard<std::mutex> g(mu_);
    return mapped_va_.size();
  }

  // pthread_atfork handlers for every host backend of the process (installed
  // once by allocator.cu). See the fork note at the top of this file.
  static void before_fork() {
    registry().mu.lock();
    for (HostBackend* b : registry().live) b->mu_.lock();
  }
  static void after_fork_in_parent() {
    for (HostBackend* b : registry().live) b->mu_.unlock();
    registry().mu.unlock();
  }
  static void after_fork_in_child() {
    for (HostBackend* b : registry().live) {
      b->make_mappings_private();
      b->forget_workers();
      b->mu_.unlock();
    }
    registry().mu.unlock();
  }

 private:
  struct Mapping {
    ChunkHandle handle;
    size_t bytes;
    bool accessible;  // set_access() has run over it
    bool read_only;   // a map_read_only() mapping (the zero chunk)
  };

  int unmap_locked(uintptr_t va, size_t bytes) {
    auto it = mapped_va_.find(va);
    if (it == mapped_va_.end()) return kBackendError;
    void* p = mmap(reinterpret_cast<void*>(va), bytes, PROT_NONE,
                   MAP_FIXED | MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) return kBackendError;
    ChunkHandle h = it->second.handle;
    if (!it->second.read_only) {
      mapped_handle_.erase(h);
    } else if (--read_only_maps_[h] == 0) {
      read_only_maps_.erase(h);
    }
    mapped_va_.erase(it);
    return kOk;
  }
  // Leaked on purpose: torch may free tensors (and so reach a backend) during
  // static destruction at exit.
  struct Registry {
    std::mutex mu;
    std::vector<HostBackend*> live;
  };
  static Registry& registry() {
    static Registry* r = new Registry;
    return *r;
  }

  // Child side of fork(): the copy streams' workers did not come along. Their
  // std::thread objects name threads of the parent, so they are dropped
  // without being joined or destroyed (either would act on the parent's
  // thread); the child is inert and never copies.
  void forget_workers() {
    for (auto& [id, cs] : copy_streams_) {
      cs->queue.clear();
      cs->stop = true;
      ::new (&cs->worker) std::thread();
    }
  }

  // Child side of fork(): the same file offsets, mapped copy-on-write. A
  // failure leaves that range PROT_NONE, so the child faults on it instead
  // of ever writing into the parent's pages.
  void make_mappings_private() {
    for (auto& [va, m] : mapped_va_) {
      int prot = m.read_only ? PROT_READ : m.accessible ? PROT_READ | PROT_WRITE : PROT_NONE;
      void* p = mmap(reinterpret_cast<void*>(va), m.bytes, prot, MAP_FIXED | MAP_PRIVATE, fd_,
                     static_cast<off_t>(m.handle));
      if (p == MAP_FAILED)
        mmap(reinterpret_cast<void*>(va), m.bytes, PROT_NONE,
             MAP_FIXED | MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    }
  }

  struct StreamClock {
    uint64_t recorded = 0, completed = 0;
    bool held = false;
  };
  struct HostEvent {
    StreamId stream;
    uint64_t seq;
  };
  // One queued step of a copy stream, run by its worker in order.
  struct Task {
    enum Kind { kCopy, kWait, kMark } kind;
    void* dst;
    const void* src;
    size_t bytes;
    StreamId stream;  // kWait: the stream waited on; kMark: this stream
    uint64_t seq;     // kWait: that stream's event; kMark: the event completed
    bool prefault = false;  // kCopy into a chunk just mapped (a swap-in)
  };
  struct CopyStream {
    std::deque<Task> queue;
    std::thread worker;
    bool stop = false;
  };

  int copy(void* dst, const void* src, size_t bytes, StreamId stream, bool into_new_mapping) {
    std::unique_lock<std::mutex> g(mu_);
    if (fire(&fail_copy_countdown_)) return kInjectedFault;
    auto it = copy_streams_.find(stream);
    if (it == copy_streams_.end()) {
      g.unlock();
      std::memcpy(dst, src, bytes);
      return kOk;
    }
    it->second->queue.push_back({Task::kCopy, dst, src, bytes, stream, 0, into_new_mapping});
    work_.notify_all();
    return kOk;
  }

  // Under mu_. Completes `ev`: a simulated stream is completed up to it (a
  // host wait on a GPU completes the work waited for); a copy stream's
  // worker is waited for, after completing what it waits on. `ev` is a copy:
  // the wait drops mu_, and events_ may reallocate meanwhile.
  void wait_locked(std::unique_lock<std::mutex>& g, HostEvent ev) {
    StreamClock& c = clocks_[ev.stream];
    auto it = copy_streams_.find(ev.stream);
    if (it == copy_streams_.end()) {
      if (c.completed < ev.seq) c.completed = ev.seq;
      work_.notify_all();
      return;
    }
    for (const Task& t : it->second->queue) {
      if (t.kind == Task::kMark && t.seq > ev.seq) break;
      if (t.kind == Task::kWait && !copy_streams_.count(t.stream)) {
        StreamClock& w = clocks_[t.stream];
        if (w.completed < t.seq) w.completed = t.seq;
      }
    }
    work_.notify_all();
    done_.wait(g, [&] { return c.completed >= ev.seq; });
  }

  void run_worker(StreamId id, CopyStream* cs) {
    std::unique_lock<std::mutex> g(mu_);
    StreamClock& mine = clocks_[id];
    for (;;) {
      work_.wait(g, [&] {
        if (cs->queue.empty()) return cs->stop;
        const Task& t = cs->queue.front();
        return t.kind != Task::kWait || clocks_[t.stream].completed >= t.seq;
      });
      if (cs->queue.empty()) return;
      Task t = cs->queue.front();
      if (t.kind == Task::kCopy) {  // the copy runs unlocked; the task stays queued until it is done
        g.unlock();
        if (t.prefault) prefault_for_write(t.dst, t.bytes);
        std::memcpy(t.dst, t.src, t.bytes);
        g.lock();
      } else if (t.kind == Task::kMark) {
        mine.completed = t.seq;
        done_.notify_all();
        work_.notify_all();  // other copy streams may wait on this one
      }
      cs->queue.pop_front();
    }
  }
  // A chunk just mapped has no page table entries: one write fault per
  // 4 KiB page would set them up one by one. Populating the range first does
  // it in one call (no-op where the kernel lacks MADV_POPULATE_WRITE).
  static void prefault_for_write(void* dst, size_t bytes) {
#ifdef MADV_POPULATE_WRITE
    const uintptr_t page = 4096, a = reinterpret_cast<uintptr_t>(dst);
    const uintptr_t lo = a & ~(page - 1), hi = (a + bytes + page - 1) & ~(page - 1);
    madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_POPULATE_WRITE);
#else
    (void)dst, (void)bytes;
#endif
  }
  // Drains the stream's queue, then ends its worker. Waits it still has on
  // simulated streams are completed, as a host wait would.
  void stop_worker(CopyStream* cs) {
    {
      std::lock_guard<std::mutex> g(mu_);
      cs->stop = true;
      for (const Task& t : cs->queue)
        if (t.kind == Task::kWait) {
          StreamClock& w = clocks_[t.stream];
          if (w.completed < t.seq) w.completed = t.seq;
        }
      work_.notify_all();
    }
    if (cs->worker.joinable()) cs->worker.join();
  }

  static bool fire(int64_t* countdown) {
    if (*countdown <= 0) return false;
    return --*countdown == 0;
  }

  int device_;
  int fd_ = -1, host_fd_ = -1;
  std::mutex mu_;
  std::condition_variable work_, done_;  // a worker has work; a copy stream's event completed
  std::unordered_map<StreamId, std::unique_ptr<CopyStream>> copy_streams_;
  size_t host_file_bytes_ = 0;
  std::unordered_map<size_t, std::vector<off_t>> free_host_offsets_;
  std::unordered_map<void*, off_t> host_maps_;
  size_t file_bytes_ = 0;
  std::unordered_map<size_t, std::vector<ChunkHandle>> free_offsets_;
  std::unordered_map<uintptr_t, Mapping> mapped_va_;
  std::unordered_map<ChunkHandle, uintptr_t> mapped_handle_;
  std::unordered_map<ChunkHandle, size_t> read_only_maps_;  // chunk -> its read-only mappings
  std::unordered_map<StreamId, StreamClock> clocks_;
  std::vector<HostEvent> events_;
  std::vector<EventHandle> free_events_;
  int64_t fail_create_countdown_ = 0, fail_map_countdown_ = 0, fail_copy_countdown_ = 0,
          fail_host_alloc_countdown_ = 0;
};

}  // namespace ellm

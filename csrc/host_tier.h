// host_tier.h: CPU memory as the KV cache's extensible buffer (DESIGN.md,
// "Balloon and scheduler"). When the device is full, KV pages deflate into
// host chunks here instead of being dropped and recomputed (kv_space.h,
// "Swap"), and inflate back at the same addresses.
//
// The tier is a ChunkPool of its own, so it keeps the device pool's ledger,
// by owner and with the same invariant:
//     created == free + sum(owner.held)   and   created <= cpu budget
// Its chunks come from HostSlabs: pinned slabs of up to kSlabChunks chunks,
// allocated when the tier's pool grows (ahead of need, in batches), so a
// swap never waits for a pinned allocation per chunk. A chunk's handle is
// its host address. A slab is freed once all its chunks are destroyed.
//
// The tier also owns the device's copy stream: every swap of every KV space
// is queued on it, beside compute, in order.
#pragma once

#include <map>
#include <mutex>
#include <vector>

#include "backend.h"
#include "pool.h"

namespace ellm {

class HostSlabs final : public ChunkSource {
 public:
  static constexpr size_t kSlabChunks = 8;

  HostSlabs(Backend* be, size_t chunk) : be_(be), chunk_(chunk) {}
  ~HostSlabs() override {
    for (auto& [base, slab] : slabs_) be_->host_free(reinterpret_cast<void*>(base), slab.chunks * chunk_);
  }

  // Chunks the slabs may hold in all: the tier's budget, so pinned memory
  // never exceeds it, even by the rest of a slab.
  void set_limit(size_t chunks) {
    std::lock_guard<std::mutex> g(mu_);
    limit_ = chunks;
  }

  int create_chunk(size_t bytes, ChunkHandle* out) override {
    std::lock_guard<std::mutex> g(mu_);
    if (bytes != chunk_) return kInvalidArgument;
    if (free_.empty()) {
      size_t n = std::min(kSlabChunks, limit_ > held_ ? limit_ - held_ : 0);
      if (n == 0) return kOutOfMemory;
      void* p = nullptr;
      int r = be_->host_alloc(n * chunk_, &p);
      if (r != kOk) return r;
      uintptr_t base = reinterpret_cast<uintptr_t>(p);
      slabs_[base] = {n, 0};
      held_ += n;
      for (size_t i = n; i-- > 0;) free_.push_back(base + i * chunk_);
    }
    uintptr_t a = free_.back();
    free_.pop_back();
    ++slab_of(a).used;
    *out = a;
    return kOk;
  }
  void destroy_chunk(ChunkHandle h, size_t) override {
    std::lock_guard<std::mutex> g(mu_);
    auto it = std::prev(slabs_.upper_bound(h));
    free_.push_back(h);
    if (--it->second.used) return;
    // The slab's last chunk: the whole slab goes back to the OS.
    uintptr_t lo = it->first, hi = lo + it->second.chunks * chunk_;
    free_.erase(std::remove_if(free_.begin(), free_.end(), [&](uintptr_t a) { return a >= lo && a < hi; }),
                free_.end());
    held_ -= it->second.chunks;
    be_->host_free(reinterpret_cast<void*>(lo), it->second.chunks * chunk_);
    slabs_.erase(it);
  }

  struct Stats {
    size_t slabs, pinned_bytes;
  };
  Stats stats() {
    std::lock_guard<std::mutex> g(mu_);
    return {slabs_.size(), held_ * chunk_};
  }

 private:
  struct Slab {
    size_t chunks, used;
  };
  Slab& slab_of(uintptr_t a) { return std::prev(slabs_.upper_bound(a))->second; }

  Backend* be_;
  size_t chunk_;
  std::mutex mu_;
  std::map<uintptr_t, Slab> slabs_;  // by base address
  std::vector<uintptr_t> free_;      // chunks of slabs not handed out
  size_t held_ = 0, limit_ = 0;      // chunks in slabs; the most allowed
};

class HostTier {
 public:
  HostTier(Backend* be, size_t chunk_bytes, size_t budget_bytes)
      : be_(be), slabs_(be, chunk_bytes), pool_(be, chunk_bytes, 0, 0, &slabs_) {
    set_budget(budget_bytes);
  }
  ~HostTier() {
    if (stream_) be_->stream_destroy(stream_);
  }

  ChunkPool& pool() { return pool_; }
  size_t chunk_bytes() const { return pool_.chunk_bytes(); }
  void* addr(ChunkId id) { return reinterpret_cast<void*>(pool_.handle(id)); }

  // Refused (kInvalidArgument) below the chunks swapped out now.
  int set_budget(size_t bytes) {
    std::lock_guard<std::mutex> g(mu_);
    size_t chunks = bytes / pool_.chunk_bytes();
    if (chunks < pool_.held_chunks()) return kInvalidArgument;
    if (chunks > limit_) slabs_.set_limit(chunks);  // raise the cap before the pool may grow to it
    int r = pool_.set_budget(bytes);
    if (r == kOk) slabs_.set_limit(chunks), limit_ = chunks;
    return r;
  }

  // The copy stream, made on first use.
  int copy_stream(StreamId* out) {
    std::lock_guard<std::mutex> g(mu_);
    if (!stream_) {
      int r = be_->stream_create(&stream_);
      if (r != kOk) return stream_ = 0, r;
    }
    *out = stream_;
    return kOk;
  }

  HostSlabs::Stats slab_stats() { return slabs_.stats(); }

 private:
  Backend* be_;
  std::mutex mu_;
  HostSlabs slabs_;  // before pool_: the pool destroys its chunks first
  ChunkPool pool_;
  size_t limit_ = 0;
  StreamId stream_ = 0;
};

}  // namespace ellm

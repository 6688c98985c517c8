// zero_chunk.h: the pool's one shared, read-only chunk of zeros.
//
// A fixed-shape KV cache (ElasticCache(fixed_shapes=True), for torch.compile)
// hands attention the whole [batch, heads, max_len, dim] range of every
// layer, so every page of its KV space must be readable; yet only the pages
// under written tokens may hold memory of the sequence's own. Every other page
// maps this chunk read-only (Backend::map_read_only): it reads as zeros, and a
// write there faults (SIGSEGV on the host backend, an illegal address on
// CUDA) instead of landing in memory that belongs to another sequence.
//
// Ledger: the zero chunk is an ordinary pool chunk, held by an owner of its
// own ("zero") that has no reclaim hook: while it is mapped anywhere it cannot
// be given to anyone. It is acquired and zero-filled when the first KV space
// takes a reference, and given back to the pool when the last reference goes,
// so `created == free + sum(held)` holds throughout and an idle pool holds no
// zero chunk. Its "zero" owner is registered once and stays (holding 0 chunks
// while unused), so owner ids do not grow with each fixed-shape cache.
//
// Locking: ZeroChunk::mu_ is taken before the pool's lock, never after. A KV
// space takes its reference before taking its own lock: the acquire may ask
// other owners to reclaim, and their hooks try_lock their spaces' locks.
#pragma once

#include <atomic>
#include <mutex>
#include <string>
#include <vector>

#include "backend.h"
#include "pool.h"

namespace ellm {

class ZeroChunk {
 public:
  explicit ZeroChunk(ChunkPool* pool) : pool_(pool) {}
  ZeroChunk(const ZeroChunk&) = delete;
  ZeroChunk& operator=(const ZeroChunk&) = delete;
  // KV spaces are destroyed before their pool (c_api.h), so no reference is
  // left here; if one is (a misuse), the chunk still goes back to the pool.
  ~ZeroChunk() {
    std::lock_guard<std::mutex> g(mu_);
    if (users_ > 0) pool_->release(owner_, 1, &id_);
    if (owner_ != kNoOwner) pool_->unregister_owner(owner_);
  }

  // Takes a reference; the first one acquires the chunk and fills it with
  // zeros. On failure nothing is held and *why says what went wrong.
  int ref(ChunkHandle* out, std::string* why) {
    std::lock_guard<std::mutex> g(mu_);
    if (users_ == 0) {
      if (owner_ == kNoOwner) owner_ = pool_->register_owner("zero", nullptr, nullptr);
      ChunkId id;
      int r = pool_->acquire(owner_, 1, &id);
      if (r != kOk) {
        *why = "no chunk for the pool's zero chunk (the pool is out of memory)";
        return r;
      }
      r = fill_with_zeros(pool_->handle(id));
      if (r != kOk) {
        pool_->release(owner_, 1, &id);
        *why = "could not fill the pool's zero chunk with zeros (backend error)";
        return r;
      }
      id_ = id;
      handle_ = pool_->handle(id);
    }
    ++users_;
    *out = handle_;
    return kOk;
  }

  // Drops a reference; the last one gives the chunk back to the pool.
  void unref() {
    std::lock_guard<std::mutex> g(mu_);
    if (users_ == 0) return;
    if (--users_ == 0) pool_->release(owner_, 1, &id_);
  }

  // Pages mapped read-only over the zero chunk, summed over all KV spaces
  // (they report each map and unmap), for stats and validate().
  void count_mapped(int64_t delta) { mapped_pages_.fetch_add(delta, std::memory_order_relaxed); }
  int64_t mapped_pages() const { return mapped_pages_.load(std::memory_order_relaxed); }

  size_t users() {
    std::lock_guard<std::mutex> g(mu_);
    return users_;
  }
  int owner() {
    std::lock_guard<std::mutex> g(mu_);
    return owner_;
  }

  // "" when consistent, else the first violation: the "zero" owner holds one
  // chunk exactly while it has users, and pages are mapped over it only then.
  std::string validate() {
    std::lock_guard<std::mutex> g(mu_);
    if (owner_ == kNoOwner) return mapped_pages() == 0 ? "" : "pages map a zero chunk that was never made";
    size_t held = pool_->snapshot().owners[owner_].held;
    if (held != (users_ > 0 ? 1u : 0u))
      return "the zero owner holds " + std::to_string(held) + " chunks with " + std::to_string(users_) +
             " users (expected " + (users_ > 0 ? "1" : "0") + ")";
    if (mapped_pages() < 0 || (mapped_pages() > 0 && users_ == 0))
      return std::to_string(mapped_pages()) + " pages map the zero chunk, which has no users";
    return "";
  }

 private:
  // Maps the chunk writable at a VA of its own for a moment, copies zeros in
  // (through the backend, so it works on both), waits for the copy and
  // unmaps. A recycled chunk holds whatever its last owner wrote, so it is
  // always filled, never assumed to be zero.
  int fill_with_zeros(ChunkHandle h) {
    Backend* be = pool_->backend();
    size_t n = pool_->chunk_bytes();
    uintptr_t va = 0;
    if (be->reserve(n, &va) != kOk) return kOutOfMemory;
    int r = be->map(va, n, h);
    if (r == kOk) {
      r = be->set_access(va, n);
      if (r == kOk) {
        std::vector<char> zeros(n, 0);
        r = be->copy_from_host(va, zeros.data(), n, 0);
        EventHandle e;
        if (r == kOk) r = be->event_record(0, &e);
        if (r == kOk) {  // `zeros` must outlive the copy
          be->event_wait(e);
          be->event_destroy(e);
        }
      }
      be->unmap(va, n);
    }
    be->release(va, n);
    return r;
  }

  ChunkPool* pool_;
  std::mutex mu_;
  int owner_ = kNoOwner;
  size_t users_ = 0;
  ChunkId id_ = 0;
  ChunkHandle handle_ = 0;
  std::atomic<int64_t> mapped_pages_{0};
};

}  // namespace ellm

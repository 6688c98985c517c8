// kv_space.h: a KV space, the C++ half of a KV cache.
//
// A VA reservation cut into pages of one chunk each; a KV tensor's address
// never moves while its pages are mapped. The Python KV manager decides what
// lives where (its large pages are runs of these pages); this class owns the
// mappings, so the pool can take chunks back from the KV cache without
// calling Python.
//
// Page states:
//   unmapped     no chunk under it
//   pinned       mapped, holds live KV: never reclaimed
//   reclaimable  mapped, holds nothing live (free, or only evictable cached
//                blocks): the pool may reclaim it when another owner (the
//                torch arena, usually) runs short. Lower priority goes first,
//                then older.
// Protocol with Python: before reusing a reclaimable page Python calls pin();
// if the page was reclaimed meanwhile pin() says so and Python drops whatever
// it had cached there. take_reclaimed() lists the pages taken since the last
// call, so Python can forget their cached blocks. Until then such a page is
// "reclaimed, unseen": set_reclaimable() on it says so as well, and unmap_page()
// says so and takes it off the list (Python has just let go of it anyway).
//
// GPU safety: unmap and reclaim honour a per-page fence, an event recorded on
// the stream given when the page stopped being live.
#pragma once

#include <algorithm>
#include <mutex>
#include <set>
#include <string>
#include <tuple>
#include <vector>

#include "backend.h"
#include "pool.h"

namespace ellm {

class KvSpace {
 public:
  enum State : uint8_t { kUnmapped, kPinned, kReclaimable };

  KvSpace(ChunkPool* pool, const char* name, size_t n_pages)
      : pool_(pool), be_(pool->backend()), chunk_(pool->chunk_bytes()), pages_(n_pages) {
    if (n_pages == 0) return;
    if (be_->reserve(chunk_ * n_pages, &base_) != kOk) {
      base_ = 0;
      return;
    }
    owner_ = pool->register_owner(name, &KvSpace::reclaim_hook, this);
  }
  ~KvSpace() { teardown(); }

  bool ok() const { return base_ != 0; }
  uintptr_t base() const { return base_; }
  size_t n_pages() const { return pages_.size(); }
  int owner() const { return owner_; }

  // Maps a chunk under each of the unmapped pages [p, p + n), all or none,
  // with one access grant for the run; they come back pinned.
  int map_pages(uint32_t p, uint32_t n) {
    std::lock_guard<std::mutex> g(mu_);
    if (n == 0 || p >= pages_.size() || n > pages_.size() - p) return kInvalidArgument;
    for (uint32_t q = p; q < p + n; ++q)  // a reclaimed page is mapped again only once Python has seen it go
      if (pages_[q].state != kUnmapped || pages_[q].reclaimed_unseen) return kInvalidArgument;
    std::vector<ChunkId> ids(n);
    int r = pool_->acquire(owner_, n, ids.data());
    if (r != kOk) return r;
    uintptr_t va = base_ + p * chunk_;
    for (uint32_t k = 0; k < n; ++k) {
      r = be_->map(va + k * chunk_, chunk_, pool_->handle(ids[k]));
      if (r != kOk) {
        for (uint32_t j = 0; j < k; ++j) be_->unmap(va + j * chunk_, chunk_);
        pool_->release(owner_, n, ids.data());
        return r == kInjectedFault ? kOutOfMemory : r;
      }
    }
    be_->set_access(va, n * chunk_);
    for (uint32_t k = 0; k < n; ++k) {
      pages_[p + k].chunk = ids[k];
      pages_[p + k].state = kPinned;
    }
    mapped_ += n;
    maps_ += n;
    return kOk;
  }

  // Unmaps a page (pinned or reclaimable) and gives its chunk to the pool,
  // once the work recorded on `stream` up to now is done. Returns 1, or 0 if
  // the pool had reclaimed it (it leaves the take_reclaimed() list), or
  // -status.
  int unmap_page(uint32_t p, StreamId stream) {
    std::lock_guard<std::mutex> g(mu_);
    if (p >= pages_.size()) return -kInvalidArgument;
    if (pages_[p].reclaimed_unseen) {
      pages_[p].reclaimed_unseen = false;
      reclaimed_.erase(std::find(reclaimed_.begin(), reclaimed_.end(), p));
      return 0;
    }
    if (pages_[p].state == kUnmapped) return -kInvalidArgument;
    fence_locked(p, stream);
    wait_fence_locked(p);
    unmap_locked(p);
    return 1;
  }

  // The page holds nothing live from now on; the pool may take it. Returns
  // 1, or 0 if the pool had reclaimed it, or -status.
  int set_reclaimable(uint32_t p, uint32_t priority, StreamId stream) {
    std::lock_guard<std::mutex> g(mu_);
    if (p >= pages_.size()) return -kInvalidArgument;
    if (pages_[p].reclaimed_unseen) return 0;
    if (pages_[p].state == kUnmapped) return -kInvalidArgument;
    Page& pg = pages_[p];
    if (pg.state == kReclaimable) reclaimable_.erase(key(p));
    fence_locked(p, stream);
    pg.state = kReclaimable;
    pg.priority = priority;
    pg.stamp = ++clock_;
    reclaimable_.insert(key(p));
    return 1;
  }

  // Returns 1 if the page is mapped and now pinned, 0 if it had been
  // reclaimed (it is unmapped; map it again to use it).
  int pin(uint32_t p) {
    std::lock_guard<std::mutex> g(mu_);
    if (p >= pages_.size()) return -kInvalidArgument;
    Page& pg = pages_[p];
    if (pg.state == kUnmapped) return 0;
    if (pg.state == kReclaimable) reclaimable_.erase(key(p));
    pg.state = kPinned;
    return 1;
  }

  size_t take_reclaimed(uint32_t* out, size_t cap) {
    std::lock_guard<std::mutex> g(mu_);
    size_t n = std::min(cap, reclaimed_.size());
    std::copy(reclaimed_.begin(), reclaimed_.begin() + n, out);
    for (size_t i = 0; i < n; ++i) pages_[reclaimed_[i]].reclaimed_unseen = false;
    reclaimed_.erase(reclaimed_.begin(), reclaimed_.begin() + n);
    return n;
  }

  // Gives back up to `want` chunks from reclaimable pages, lowest priority
  // and oldest first, skipping pages whose fence is not done yet.
  size_t reclaim(size_t want) {
    std::lock_guard<std::mutex> g(mu_);
    return reclaim_locked(want);
  }

  State state(uint32_t p) {
    std::lock_guard<std::mutex> g(mu_);
    return p < pages_.size() ? pages_[p].state : kUnmapped;
  }

  struct Stats {
    uint64_t mapped_pages, reclaimable_pages, maps, unmaps, reclaimed_pages;
  };
  Stats stats() {
    std::lock_guard<std::mutex> g(mu_);
    return {mapped_, reclaimable_.size(), maps_, unmaps_, reclaimed_total_};
  }

  size_t teardown() {
    std::lock_guard<std::mutex> g(mu_);
    if (!base_) return 0;
    size_t was_mapped = mapped_;
    for (uint32_t p = 0; p < pages_.size(); ++p)
      if (pages_[p].state != kUnmapped) {
        wait_fence_locked(p);
        unmap_locked(p);
      }
    pool_->unregister_owner(owner_);
    be_->release(base_, chunk_ * pages_.size());
    base_ = 0;
    return was_mapped;
  }

 private:
  struct Page {
    State state = kUnmapped;
    uint32_t priority = 0;
    uint64_t stamp = 0;
    bool fenced = false;
    bool reclaimed_unseen = false;  // reclaimed, and still in reclaimed_
    EventHandle fence = 0;
    ChunkId chunk = 0;  // while mapped
  };
  std::tuple<uint32_t, uint64_t, uint32_t> key(uint32_t p) const {
    return {pages_[p].priority, pages_[p].stamp, p};
  }

  void fence_locked(uint32_t p, StreamId stream) {
    Page& pg = pages_[p];
    if (pg.fenced) be_->event_destroy(pg.fence);
    pg.fenced = be_->event_record(stream, &pg.fence) == kOk;
  }
  bool fence_done_locked(uint32_t p) {
    Page& pg = pages_[p];
    if (!pg.fenced) return true;
    if (!be_->event_done(pg.fence)) return false;
    be_->event_destroy(pg.fence);
    pg.fenced = false;
    return true;
  }
  void wait_fence_locked(uint32_t p) {
    Page& pg = pages_[p];
    if (!pg.fenced) return;
    be_->event_wait(pg.fence);
    be_->event_destroy(pg.fence);
    pg.fenced = false;
  }
  void unmap_locked(uint32_t p) {
    Page& pg = pages_[p];
    if (pg.state == kReclaimable) reclaimable_.erase(key(p));
    be_->unmap(base_ + p * chunk_, chunk_);
    pool_->release(owner_, 1, &pg.chunk);
    pg.state = kUnmapped;
    --mapped_;
    ++unmaps_;
  }
  size_t reclaim_locked(size_t want) {
    size_t got = 0;
    for (auto it = reclaimable_.begin(); it != reclaimable_.end() && got < want;) {
      uint32_t p = std::get<2>(*it);
      ++it;  // unmap_locked erases the current entry
      if (!fence_done_locked(p)) continue;
      ++got;
      unmap_locked(p);
      reclaimed_.push_back(p);
      pages_[p].reclaimed_unseen = true;
      ++reclaimed_total_;
    }
    return got;
  }
  static size_t reclaim_hook(void* ctx, size_t want) {
    KvSpace* s = static_cast<KvSpace*>(ctx);
    std::unique_lock<std::mutex> g(s->mu_, std::try_to_lock);
    if (!g.owns_lock()) return 0;
    return s->reclaim_locked(want);
  }

  ChunkPool* pool_;
  Backend* be_;
  size_t chunk_;
  uintptr_t base_ = 0;
  int owner_ = -1;
  std::mutex mu_;
  std::vector<Page> pages_;
  std::set<std::tuple<uint32_t, uint64_t, uint32_t>> reclaimable_;
  std::vector<uint32_t> reclaimed_;
  uint64_t clock_ = 0, mapped_ = 0, maps_ = 0, unmaps_ = 0, reclaimed_total_ = 0;
};

}  // namespace ellm

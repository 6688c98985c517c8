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
//
// Zero fill (fixed-shape caches, for torch.compile; see zero_chunk.h). After
// set_zero_fill(), every page without a chunk of its own maps the pool's zero
// chunk read-only, in a fourth state:
//   zero         reads as zeros, a write faults; holds no chunk of its own
// now and whenever a page loses its chunk later (unmap, reclaim), so a read
// anywhere in the range never faults. map_pages() takes the zero mapping off
// before mapping the page's own chunk. A zero page is not "mapped": unmapping,
// pinning or marking it reclaimable is refused as for an unmapped one.
// clear_zero_fill() and teardown take every zero mapping off again.
// Swapping a page between its own chunk and the zero chunk is an unmap then a
// map, so a read racing with it could fault: callers order a swap after the
// work that reads the page (unmap and reclaim honour the page's fence;
// map_pages() waits for the default stream before replacing zero pages).
#pragma once

#include <algorithm>
#include <mutex>
#include <set>
#include <string>
#include <tuple>
#include <vector>

#include "backend.h"
#include "pool.h"
#include "zero_chunk.h"

namespace ellm {

class KvSpace {
 public:
  enum State : uint8_t { kUnmapped, kPinned, kReclaimable, kZero };

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
    uint32_t zeros = 0;
    for (uint32_t q = p; q < p + n; ++q) {  // a reclaimed page is mapped again only once Python has seen it go
      if ((pages_[q].state != kUnmapped && pages_[q].state != kZero) || pages_[q].reclaimed_unseen)
        return kInvalidArgument;
      zeros += pages_[q].state == kZero;
    }
    std::vector<ChunkId> ids(n);
    int r = pool_->acquire(owner_, n, ids.data());
    if (r != kOk) return r;
    uintptr_t va = base_ + p * chunk_;
    // Kernels queued before now may still read the zero pages (a fixed-shape
    // cache's attention reads its whole range): let them finish first.
    if (zeros) wait_device_locked();
    std::vector<bool> was_zero(n);
    for (uint32_t k = 0; k < n; ++k) {
      if ((was_zero[k] = pages_[p + k].state == kZero)) {
        be_->unmap(va + k * chunk_, chunk_);
        pages_[p + k].state = kUnmapped;
        --zero_pages_;
        zero_->count_mapped(-1);
      }
      r = be_->map(va + k * chunk_, chunk_, pool_->handle(ids[k]));
      if (r != kOk) {  // all or none: the pages go back to what they were
        if (was_zero[k]) remap_zero_locked(p + k);
        for (uint32_t j = 0; j < k; ++j) {
          be_->unmap(va + j * chunk_, chunk_);
          if (was_zero[j]) remap_zero_locked(p + j);
        }
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
    if (pages_[p].state == kUnmapped || pages_[p].state == kZero) return -kInvalidArgument;
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
    if (pages_[p].state == kUnmapped || pages_[p].state == kZero) return -kInvalidArgument;
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
    if (pg.state == kUnmapped || pg.state == kZero) return 0;
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

  // Turns zero fill on (see the top of this file): maps `zero`'s chunk under
  // every page that has no chunk of its own. All or nothing; refused if it is
  // on already or the space is torn down.
  int set_zero_fill(ZeroChunk* zero, std::string* why) {
    {
      std::lock_guard<std::mutex> g(mu_);
      if (!base_) return *why = "the KV space is destroyed", kInvalidArgument;
      if (zero_) return *why = "zero fill is on already", kInvalidArgument;
    }
    ChunkHandle h;
    int r = zero->ref(&h, why);  // before our lock: it may reclaim from KV spaces
    if (r != kOk) return r;
    std::lock_guard<std::mutex> g(mu_);
    if (zero_ || !base_) {  // another thread won the race, or tore the space down
      zero->unref();
      return *why = zero_ ? "zero fill is on already" : "the KV space is destroyed", kInvalidArgument;
    }
    zero_ = zero;
    zero_handle_ = h;
    for (uint32_t p = 0; p < pages_.size();) {  // one read-only grant per run of chunkless pages
      uint32_t q = p;
      while (q < pages_.size() && pages_[q].state == kUnmapped) ++q;
      if (q > p) {
        r = be_->map_read_only(base_ + p * chunk_, (q - p) * chunk_, h, chunk_);
        if (r != kOk) {
          clear_zero_fill_locked();
          zero->unref();
          return *why = "could not map the zero chunk under the KV space's pages", r;
        }
        for (uint32_t k = p; k < q; ++k) pages_[k].state = kZero;
        zero_pages_ += q - p;
        zero->count_mapped(q - p);
      }
      p = q + 1;
    }
    return kOk;
  }

  // Takes every zero mapping off (those pages fault again when touched) and
  // drops the space's reference to the zero chunk. Refused if zero fill is off.
  int clear_zero_fill() {
    ZeroChunk* zero;
    {
      std::lock_guard<std::mutex> g(mu_);
      if (!zero_) return kInvalidArgument;
      zero = zero_;
      clear_zero_fill_locked();
    }
    zero->unref();
    return kOk;
  }

  bool zero_fill() {
    std::lock_guard<std::mutex> g(mu_);
    return zero_ != nullptr;
  }

  struct Stats {
    uint64_t mapped_pages, reclaimable_pages, maps, unmaps, reclaimed_pages, zero_pages;
  };
  Stats stats() {
    std::lock_guard<std::mutex> g(mu_);
    return {mapped_, reclaimable_.size(), maps_, unmaps_, reclaimed_total_, zero_pages_};
  }

  size_t teardown() {
    std::lock_guard<std::mutex> g(mu_);
    if (!base_) return 0;
    size_t was_mapped = mapped_;
    ZeroChunk* zero = zero_;
    if (zero) {
      wait_device_locked();  // kernels may still read the zero pages
      clear_zero_fill_locked();  // first, so that unmap_locked() maps no zero page again
    }
    for (uint32_t p = 0; p < pages_.size(); ++p)
      if (pages_[p].state != kUnmapped) {
        wait_fence_locked(p);
        unmap_locked(p);
      }
    if (zero) zero->unref();
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
    if (zero_) remap_zero_locked(p);
  }
  // Puts the zero chunk back under a page that has just lost its own. If the
  // backend refuses, the page stays unmapped: a read then faults, which is
  // loud, and nothing ever aliases another owner's memory.
  void remap_zero_locked(uint32_t p) {
    if (be_->map_read_only(base_ + p * chunk_, chunk_, zero_handle_, chunk_) != kOk) {
      pages_[p].state = kUnmapped;
      ++zero_map_failures_;
      return;
    }
    pages_[p].state = kZero;
    ++zero_pages_;
    zero_->count_mapped(1);
  }
  void clear_zero_fill_locked() {
    uint64_t n = 0;
    for (uint32_t p = 0; p < pages_.size(); ++p)
      if (pages_[p].state == kZero) {
        be_->unmap(base_ + p * chunk_, chunk_);
        pages_[p].state = kUnmapped;
        ++n;
      }
    zero_pages_ -= n;
    zero_->count_mapped(-static_cast<int64_t>(n));
    zero_ = nullptr;
  }
  // Waits for the work queued on the default stream so far (on CUDA's legacy
  // default stream: for every blocking stream's work); only zero pages need
  // it, since every kernel of a fixed-shape cache may read them.
  void wait_device_locked() {
    EventHandle e;
    if (be_->event_record(0, &e) != kOk) return;
    be_->event_wait(e);
    be_->event_destroy(e);
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
  ZeroChunk* zero_ = nullptr;  // set while zero fill is on
  ChunkHandle zero_handle_ = 0;
  uint64_t zero_pages_ = 0, zero_map_failures_ = 0;
};

}  // namespace ellm

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
//
// Swap (the host tier, host_tier.h). A page's bytes move to a host chunk and
// back while its VA stays reserved, so its address never changes:
//   swapping out  copy to the host chunk queued on the tier's copy stream,
//                 after the work queued on the caller's stream; the device
//                 chunk is still mapped and held
//   swapped       the copy is done: the device chunk is unmapped and back in
//                 the pool; the page holds a host chunk only
//   swapping in   a fresh device chunk is mapped at the same VA and the copy
//                 back is queued; the host chunk is held until it is done
// A swap ends (finish_swaps) only once its copy's event is done: a device
// chunk is never recycled while the copy still reads it, and a host chunk
// never while the copy back still reads it. No state here is reclaimable,
// pinnable or mappable, so a page being swapped can be neither reclaimed nor
// mapped twice. Nothing here waits on the device as a whole: each page waits
// on its own copy's event. unmap_page() on a swapped page drops its bytes
// (the request they belonged to is gone). Zero-filled spaces do not swap.
#pragma once

#include <algorithm>
#include <mutex>
#include <set>
#include <string>
#include <tuple>
#include <vector>

#include "backend.h"
#include "host_tier.h"
#include "pool.h"
#include "zero_chunk.h"

namespace ellm {

class KvSpace {
 public:
  enum State : uint8_t { kUnmapped, kPinned, kReclaimable, kZero, kSwappingOut, kSwapped, kSwappingIn };

  KvSpace(ChunkPool* pool, const char* name, size_t n_pages, HostTier* host = nullptr)
      : pool_(pool), be_(pool->backend()), chunk_(pool->chunk_bytes()), host_(host), pages_(n_pages) {
    if (n_pages == 0) return;
    if (be_->reserve(chunk_ * n_pages, &base_) != kOk) {
      base_ = 0;
      return;
    }
    owner_ = pool->register_owner(name, &KvSpace::reclaim_hook, this);
    if (host_) host_owner_ = host_->pool().register_owner(name, nullptr, nullptr);
  }
  ~KvSpace() { teardown(); }

  bool ok() const { return base_ != 0; }
  uintptr_t base() const { return base_; }
  size_t n_pages() const { return pages_.size(); }
  int owner() const { return owner_; }
  int host_owner() const { return host_owner_; }

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
    if (is_swap(pages_[p].state)) {  // its bytes are no longer wanted
      drop_swapped_locked(p);
      return 1;
    }
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
    if (pages_[p].state == kSwappingIn) finish_locked(p, true);  // resident once its copy lands
    if (pages_[p].state != kPinned && pages_[p].state != kReclaimable) return -kInvalidArgument;
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
    if (pg.state == kSwappingIn) finish_locked(p, true);
    if (pg.state == kSwappingOut || pg.state == kSwapped) return -kInvalidArgument;
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

  // ---- swap (see the top of this file) ----

  // Queues the copy of pages[0..n) (each pinned or reclaimable, listed once)
  // to host chunks, after the work queued on `stream` so far; they become
  // swapping out. All or nothing: without host chunks for all of them
  // (kOutOfMemory) or when a copy cannot be queued, every page stays as it
  // was and no host chunk stays taken.
  int swap_out(const uint32_t* pages, uint32_t n, StreamId stream, std::string* why) {
    std::lock_guard<std::mutex> g(mu_);
    StreamId copy;
    int r = swap_preamble_locked(pages, n, &copy, why);
    if (r != kOk) return r;
    for (uint32_t i = 0; i < n; ++i) {
      uint32_t p = pages[i];
      if (pages_[p].state == kSwappingIn) finish_locked(p, true);  // its bytes land first
      if (pages_[p].state != kPinned && pages_[p].state != kReclaimable)
        return mark_clear_locked(pages, n), *why = "page " + std::to_string(p) + " holds no data to swap out",
               kInvalidArgument;
    }
    mark_clear_locked(pages, n);
    std::vector<ChunkId> ids(n);
    if (host_->pool().acquire(host_owner_, n, ids.data()) != kOk)
      return *why = "the host tier has no room for " + std::to_string(n) + " more chunks (cpu budget spent)",
             kOutOfMemory;
    // The copy reads what the caller's stream (and each page's last user) wrote.
    if ((r = order_after_locked(copy, stream)) != kOk) {
      host_->pool().release(host_owner_, n, ids.data());
      return *why = "could not order the copy stream after the caller's", r;
    }
    for (uint32_t i = 0; i < n; ++i)
      if (pages_[pages[i]].fenced) be_->stream_wait_event(copy, pages_[pages[i]].fence);
    uint32_t queued = 0;
    for (; queued < n; ++queued) {
      uint32_t p = pages[queued];
      r = be_->copy_to_host(host_->addr(ids[queued]), base_ + p * chunk_, chunk_, copy);
      if (r != kOk) break;
    }
    if (r != kOk) {  // the copies queued so far still read the pages: let them end first
      EventHandle e;
      if (be_->event_record(copy, &e) == kOk) {
        be_->event_wait(e);
        be_->event_destroy(e);
      }
      host_->pool().release(host_owner_, n, ids.data());
      return *why = "copying page " + std::to_string(pages[queued]) + " to the host failed", r;
    }
    for (uint32_t i = 0; i < n; ++i) {
      uint32_t p = pages[i];
      Page& pg = pages_[p];
      if (pg.state == kReclaimable) reclaimable_.erase(key(p));
      if (pg.fenced) be_->event_destroy(pg.fence);  // the copy waits on it already
      pg.fenced = be_->event_record(copy, &pg.fence) == kOk;
      pg.host = ids[i];
      ++host_pages_;
      pg.state = kSwappingOut;
      swapping_.insert(p);
    }
    ++swap_outs_;
    swapped_out_pages_ += n;
    return kOk;
  }

  // Maps a fresh device chunk under each of pages[0..n) (swapped, or still
  // swapping out) at its own VA and queues the copy back. A page still
  // swapping out keeps its device chunk: its copy is waited for and dropped.
  // All or nothing: kOutOfMemory when the pool cannot give the chunks. The
  // pages are swapping in until finish_swaps() sees their copies done; make
  // a stream wait for them with swap_wait().
  int swap_in(const uint32_t* pages, uint32_t n, StreamId stream, std::string* why) {
    (void)stream;  // the copy reads host memory only: it need not wait for compute
    std::lock_guard<std::mutex> g(mu_);
    StreamId copy;
    int r = swap_preamble_locked(pages, n, &copy, why);
    if (r != kOk) return r;
    std::vector<uint32_t> need;
    for (uint32_t i = 0; i < n; ++i) {
      uint32_t p = pages[i];
      if (pages_[p].state != kSwapped && pages_[p].state != kSwappingOut)
        return mark_clear_locked(pages, n), *why = "page " + std::to_string(p) + " is not swapped out",
               kInvalidArgument;
    }
    mark_clear_locked(pages, n);
    finish_swaps_locked(false);
    for (uint32_t i = 0; i < n; ++i)
      if (pages_[pages[i]].state == kSwapped) need.push_back(pages[i]);
    std::vector<ChunkId> ids(need.size());
    if (!need.empty() && (r = pool_->acquire(owner_, need.size(), ids.data())) != kOk)
      return *why = "the pool has no " + std::to_string(need.size()) + " free chunks to swap in", r;
    size_t mapped = 0;
    for (; mapped < need.size() && r == kOk; ++mapped) {
      uintptr_t va = base_ + need[mapped] * chunk_;
      if ((r = be_->map(va, chunk_, pool_->handle(ids[mapped]))) != kOk) break;
      r = be_->set_access(va, chunk_);
      if (r == kOk) r = be_->copy_from_host(va, host_->addr(pages_[need[mapped]].host), chunk_, copy);
    }
    if (r != kOk) {  // back to swapped, once the copies queued so far are done
      EventHandle e;
      if (be_->event_record(copy, &e) == kOk) {
        be_->event_wait(e);
        be_->event_destroy(e);
      }
      for (size_t j = 0; j < mapped; ++j) be_->unmap(base_ + need[j] * chunk_, chunk_);
      pool_->release(owner_, need.size(), ids.data());
      return *why = "swapping in failed: the device mapping or the copy back was refused", r;
    }
    for (uint32_t i = 0; i < n; ++i) {  // pages still swapping out: keep their device chunk
      uint32_t p = pages[i];
      if (pages_[p].state != kSwappingOut) continue;
      wait_fence_locked(p);
      swapping_.erase(p);
      release_host_locked(p);
      pages_[p].state = kPinned;
    }
    for (size_t j = 0; j < need.size(); ++j) {
      Page& pg = pages_[need[j]];
      pg.chunk = ids[j];
      pg.fenced = be_->event_record(copy, &pg.fence) == kOk;
      pg.state = kSwappingIn;
      swapping_.insert(need[j]);
    }
    mapped_ += need.size();
    maps_ += need.size();
    ++swap_ins_;
    swapped_in_pages_ += need.size();
    return kOk;
  }

  // Ends the swaps whose copies are done (all of them, waiting, if `wait`):
  // swapped-out pages give their device chunk back, swapped-in pages their
  // host chunk. Returns the pages that changed state.
  size_t finish_swaps(bool wait) {
    std::lock_guard<std::mutex> g(mu_);
    return finish_swaps_locked(wait);
  }

  // Work queued on `stream` after this call sees pages[0..n) swapped in: on
  // a GPU the stream waits for their copies (the host does not); on the host
  // backend the caller waits for them.
  int swap_wait(const uint32_t* pages, uint32_t n, StreamId stream) {
    std::lock_guard<std::mutex> g(mu_);
    for (uint32_t i = 0; i < n; ++i) {
      if (pages[i] >= pages_.size()) return kInvalidArgument;
      Page& pg = pages_[pages[i]];
      if (pg.state == kSwappingIn && pg.fenced) {
        int r = be_->stream_wait_event(stream, pg.fence);
        if (r != kOk) return r;
      }
    }
    return kOk;
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
    uint64_t host_pages, swapping_pages, swap_outs, swap_ins, swapped_out_pages, swapped_in_pages;
  };
  Stats stats() {
    std::lock_guard<std::mutex> g(mu_);
    return {mapped_, reclaimable_.size(), maps_, unmaps_, reclaimed_total_, zero_pages_,
            host_pages_, swapping_.size(), swap_outs_, swap_ins_, swapped_out_pages_, swapped_in_pages_};
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
    for (uint32_t p = 0; p < pages_.size(); ++p) {
      if (is_swap(pages_[p].state)) {
        drop_swapped_locked(p);
      } else if (pages_[p].state != kUnmapped) {
        wait_fence_locked(p);
        unmap_locked(p);
      }
    }
    if (zero) zero->unref();
    if (host_) host_->pool().unregister_owner(host_owner_);
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
    bool listed = false;            // seen once in the page list of the call under way
    EventHandle fence = 0;          // last use; while swapping, the copy's end
    ChunkId chunk = 0;  // while mapped (swapping out and in included)
    ChunkId host = 0;   // while swapping or swapped
  };
  static bool is_swap(State s) { return s == kSwappingOut || s == kSwapped || s == kSwappingIn; }

  // Checks a swap call's page list (in range, listed once, not reclaimed
  // unseen) and that the space may swap; marks the pages `listed` (the
  // caller clears them), gets the copy stream.
  int swap_preamble_locked(const uint32_t* pages, uint32_t n, StreamId* copy, std::string* why) {
    if (!base_) return *why = "the KV space is destroyed", kInvalidArgument;
    if (!host_) return *why = "this pool has no host tier", kInvalidArgument;
    if (zero_) return *why = "a zero-filled KV space (fixed shapes) does not swap", kInvalidArgument;
    if (n == 0) return *why = "no pages given", kInvalidArgument;
    for (uint32_t i = 0; i < n; ++i) {
      uint32_t p = pages[i];
      std::string bad = p >= pages_.size() ? "is out of range"
                        : pages_[p].listed ? "is listed twice"
                        : pages_[p].reclaimed_unseen ? "was reclaimed by the pool" : "";
      if (!bad.empty()) {
        mark_clear_locked(pages, i);
        return *why = "page " + std::to_string(p) + " " + bad, kInvalidArgument;
      }
      pages_[p].listed = true;
    }
    int r = host_->copy_stream(copy);
    if (r != kOk) {
      mark_clear_locked(pages, n);
      *why = "could not create the copy stream";
    }
    return r;
  }
  void mark_clear_locked(const uint32_t* pages, uint32_t n) {
    for (uint32_t i = 0; i < n; ++i) pages_[pages[i]].listed = false;
  }
  // Work queued on `copy` from now runs after the work queued on `stream`.
  int order_after_locked(StreamId copy, StreamId stream) {
    EventHandle e;
    int r = be_->event_record(stream, &e);
    if (r != kOk) return r;
    r = be_->stream_wait_event(copy, e);
    be_->event_destroy(e);
    return r;
  }
  // A swap whose copy is done (or waited for, if `wait`) takes its end state.
  bool finish_locked(uint32_t p, bool wait) {
    Page& pg = pages_[p];
    if (wait) wait_fence_locked(p);
    else if (!fence_done_locked(p)) return false;
    swapping_.erase(p);
    if (pg.state == kSwappingOut) {
      be_->unmap(base_ + p * chunk_, chunk_);
      pool_->release(owner_, 1, &pg.chunk);
      --mapped_;
      ++unmaps_;
      pg.state = kSwapped;
    } else {
      release_host_locked(p);
      pg.state = kPinned;
    }
    return true;
  }
  size_t finish_swaps_locked(bool wait) {
    size_t n = 0;
    for (auto it = swapping_.begin(); it != swapping_.end();) {
      uint32_t p = *it++;  // finish_locked erases p
      n += finish_locked(p, wait);
    }
    return n;
  }
  void release_host_locked(uint32_t p) {
    host_->pool().release(host_owner_, 1, &pages_[p].host);
    --host_pages_;
  }
  // A swapping or swapped page whose bytes nobody wants: every chunk it
  // holds goes back, after its copy (which still reads them) is done.
  void drop_swapped_locked(uint32_t p) {
    Page& pg = pages_[p];
    if (pg.state != kSwapped) {
      wait_fence_locked(p);
      swapping_.erase(p);
      be_->unmap(base_ + p * chunk_, chunk_);
      pool_->release(owner_, 1, &pg.chunk);
      --mapped_;
      ++unmaps_;
    }
    release_host_locked(p);
    pg.state = kUnmapped;
  }
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
    // Swaps out whose copy is done hold device chunks for nothing: those go first.
    size_t got = 0;
    for (auto it = swapping_.begin(); it != swapping_.end() && got < want;) {
      uint32_t p = *it++;
      if (pages_[p].state == kSwappingOut && finish_locked(p, false)) ++got;
    }
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
  HostTier* host_;
  int host_owner_ = -1;
  std::set<uint32_t> swapping_;  // pages swapping out or in
  uint64_t host_pages_ = 0, swap_outs_ = 0, swap_ins_ = 0, swapped_out_pages_ = 0, swapped_in_pages_ = 0;
  ZeroChunk* zero_ = nullptr;  // set while zero fill is on
  ChunkHandle zero_handle_ = 0;
  uint64_t zero_pages_ = 0, zero_map_failures_ = 0;
};

}  // namespace ellm

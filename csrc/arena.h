// arena.h: torch's malloc/free on top of the chunk pool.
//
// VA first. One large VA reservation per device; blocks are placed best-fit
// in it; a physical chunk is mapped under every VA chunk that holds a live
// (or cached) byte. Physical waste is therefore limited to partly used
// boundary chunks, and VA holes cost nothing.
//
// Three tiers, fastest first:
//   1. small sizes (<= kSmallMax) come from size-class slabs: a 64-object
//      bitmap per slab, so malloc is "find first set bit";
//   2. freed large blocks are cached per stream by exact size: a later
//      malloc of that size on that stream is a list pop;
//   3. everything else goes to the best-fit free-segment index and may map
//      chunks (slow path).
// All three share one mutex; the fast paths never call the driver.
//
// Streams. A block freed on stream S is reused at once on S (stream order
// makes that safe). It becomes available to other streams only when it
// leaves S's cache, at which point an event is recorded on S and attached to
// the free range as a fence; another stream may take the range only after
// the fence completes. record_stream() adds streams whose events are
// recorded at free. A physical chunk is unmapped or moved only when every
// fence on it is complete, so the GPU never loses memory it is still using.
//
// Peak footprint. Before the arena grows (takes chunks from the pool) it
// flushes the per-stream caches and retries placement, and it reuses its own
// idle mapped chunks (moving them to the new VA) before asking the pool. So
// the chunks it holds never exceed the peak of what best-fit placement of
// the live blocks needs: caching costs no physical memory at the peak.
#pragma once

#include <algorithm>
#include <cstdio>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <unordered_map>
#include <vector>
#include <deque>

#include "backend.h"
#include "pool.h"
#include "ptrmap.h"

namespace ellm {

constexpr size_t kAlign = 512;
constexpr size_t kSmallMax = 8192;
constexpr size_t kSmallClasses = kSmallMax / kAlign;  // class c holds (c+1)*512 bytes
constexpr size_t kSlabTarget = 64 << 10;              // bytes per slab, at most 64 objects

struct FenceEntry {
  uint32_t stream;  // index into Arena::streams_
  uint64_t seq;     // event sequence number on that stream
};
// "The GPU is done with these bytes once each of these events completes."
// At most one entry per stream: a later event on a stream subsumes earlier ones.
using Fence = std::vector<FenceEntry>;

inline void merge_fence(Fence& into, const Fence& from) {
  for (const FenceEntry& f : from) {
    bool found = false;
    for (FenceEntry& e : into)
      if (e.stream == f.stream) {
        e.seq = std::max(e.seq, f.seq);
        found = true;
      }
    if (!found) into.push_back(f);
  }
}

struct ArenaStats {
  uint64_t allocated_bytes, allocated_peak;  // live blocks, rounded sizes
  uint64_t active_bytes, active_peak;        // live + cached for reuse on their stream
  uint64_t reserved_bytes, reserved_peak;    // chunks mapped by the arena
  uint64_t cached_bytes;
  uint64_t va_bytes;
  uint64_t num_allocs, num_frees, fast_allocs;
  uint64_t chunk_maps, chunk_unmaps, chunk_moves;  // moves: idle chunk remapped to new VA
  uint64_t cache_flushes, ooms, invalid_frees, live_blocks;
};

class Arena {
 public:
  static constexpr uint32_t kAnyStream = UINT32_MAX;

  Arena(ChunkPool* pool, size_t va_bytes) : pool_(pool), be_(pool->backend()) {
    chunk_ = pool->chunk_bytes();
    va_bytes_ = (va_bytes + chunk_ - 1) / chunk_ * chunk_;
    if (be_->reserve(va_bytes_, &base_) != kOk) {
      base_ = 0;
      return;
    }
    slots_.resize(va_bytes_ / chunk_);
    add_free(base_, va_bytes_, {});
    owner_ = pool->register_owner("arena", &Arena::reclaim_hook, this);
  }
  ~Arena() { teardown(); }
  bool ok() const { return base_ != 0; }
  int owner() const { return owner_; }
  uintptr_t base() const { return base_; }
  bool contains(uintptr_t p) const { return p >= base_ && p < base_ + va_bytes_; }

  // ---- fast paths ------------------------------------------------------

  int malloc(size_t size, StreamId stream, void** out) {
    if (size > va_bytes_) return kOutOfMemory;  // cannot fit; and round_up() would wrap near SIZE_MAX
    size_t rs = round_up(size);
    std::lock_guard<std::mutex> g(mu_);
    uint32_t si = stream_index(stream);
    ++st_.num_allocs;
    if (rs <= kSmallMax) return malloc_small(rs, si, out);
    Stream& s = *streams_[si];
    auto it = s.bins.find(rs);
    if (it != s.bins.end() && it->second) {  // tier 2: exact-size cache of this stream
      Block* b = it->second;
      it->second = b->next;
      b->state = Block::kLive;
      --cached_blocks_;
      s.cached_bytes -= rs;
      st_.cached_bytes -= rs;
      ++st_.fast_allocs;
      note_alloc(rs, false);
      *out = reinterpret_cast<void*>(b->addr);
      return kOk;
    }
    return malloc_large(rs, si, out);
  }

  int free(void* ptr, StreamId stream) {
    uintptr_t p = reinterpret_cast<uintptr_t>(ptr);
    std::lock_guard<std::mutex> g(mu_);
    uintptr_t v = live_.find(p);
    if (v == 0) {
      ++st_.invalid_frees;
      return contains(p) ? kDoubleFree : kInvalidPointer;
    }
    if (v & 1) {
      ++st_.num_frees;
      return free_small(p, reinterpret_cast<Slab*>(v & ~uintptr_t(1)));
    }
    Block* b = reinterpret_cast<Block*>(v);
    if (b->state != Block::kLive) {
      ++st_.invalid_frees;
      return kDoubleFree;
    }
    ++st_.num_frees;
    (void)stream;  // torch passes the allocation stream; the block knows its own
    note_free(b->size);
    if (!b->uses.empty()) {  // used on other streams: fence them all, skip the cache
      Fence f = record_uses(b->stream, b->uses);
      live_.erase(p);
      free_range(b->addr, b->size, f);
      drop_block(b);
      return kOk;
    }
    Stream& s = *streams_[b->stream];
    b->state = Block::kCached;
    ++cached_blocks_;
    Block*& head = s.bins[b->size];
    b->next = head;
    head = b;
    s.cached_bytes += b->size;
    st_.cached_bytes += b->size;
    if (s.cached_bytes > cache_limit()) flush_stream(b->stream);
    return kOk;
  }

  // torch's record_stream hook: `stream` will use the block too.
  int record_stream(void* ptr, StreamId stream) {
    uintptr_t p = reinterpret_cast<uintptr_t>(ptr);
    std::lock_guard<std::mutex> g(mu_);
    uintptr_t v = live_.find(p);
    if (v == 0) return kInvalidPointer;
    uint32_t si = stream_index(stream);
    if (v & 1) {
      Slab* sl = reinterpret_cast<Slab*>(v & ~uintptr_t(1));
      if (si != sl->stream) add_use(small_uses_[p], si);
      return kOk;
    }
    Block* b = reinterpret_cast<Block*>(v);
    if (b->state != Block::kLive) return kInvalidPointer;
    if (si != b->stream) add_use(b->uses, si);
    return kOk;
  }

  // ---- maintenance -----------------------------------------------------

  // torch.cuda.empty_cache(): flush caches, unmap every idle chunk whose
  // fences are done, and hand the chunks back to the pool.
  size_t empty_cache() {
    std::lock_guard<std::mutex> g(mu_);
    flush_all();
    return release_idle(SIZE_MAX);
  }

  ArenaStats stats() {
    std::lock_guard<std::mutex> g(mu_);
    ArenaStats s = st_;
    s.va_bytes = va_bytes_;
    s.live_blocks = live_.size() - cached_blocks_;
    return s;
  }
  void reset_peaks() {
    std::lock_guard<std::mutex> g(mu_);
    st_.allocated_peak = st_.allocated_bytes;
    st_.active_peak = st_.active_bytes;
    st_.reserved_peak = st_.reserved_bytes;
  }

  // Checks every structural invariant; returns "" or a description of the
  // first violation. O(blocks + chunks): for tests.
  std::string validate();

  // Frees everything; returns the number of live blocks that were leaked.
  size_t teardown();

 private:
  struct Block {
    enum State : uint8_t { kLive, kCached };
    uintptr_t addr;
    size_t size;
    uint32_t stream;
    State state;
    Fence uses;  // record_stream streams (seq unused)
    Block* next;
  };
  struct Slab {
    uintptr_t addr;
    uint32_t cls, nobj, stream;
    uint64_t free_bits;  // bit i set: object i is free
    Slab *prev, *next;   // the stream's partial list for this class
    bool listed;
    size_t obj_bytes() const { return (cls + 1) * kAlign; }
    size_t bytes() const { return nobj * obj_bytes(); }
    uint64_t full_mask() const { return nobj == 64 ? ~0ull : ((1ull << nobj) - 1); }
  };
  struct DeferredObject {  // a small object freed while other streams may use it
    Slab* slab;
    uintptr_t addr;
    Fence fence;
  };
  struct Stream {
    StreamId id;
    Slab* partial[kSmallClasses] = {};
    uint32_t empty_listed[kSmallClasses] = {};  // fully free slabs kept in `partial`
    std::vector<Slab*> retired;                 // surplus empty slabs, flushed with the cache
    std::unordered_map<size_t, Block*> bins;    // exact rounded size -> stack of cached blocks
    size_t cached_bytes = 0;
    std::vector<DeferredObject> deferred;
    std::deque<std::pair<uint64_t, EventHandle>> pending;  // recorded, not yet known done
    uint64_t next_seq = 0, completed = 0;
  };
  struct Slot {             // one chunk-sized piece of the VA reservation
    int64_t chunk = -1;     // ChunkId mapped here, or -1
    uint32_t users = 0;     // blocks and slabs (live or cached) overlapping it
    bool idle = false;      // mapped, no users: can be moved or released
    Fence fence;
  };
  struct Seg {
    size_t size;
    Fence fence;
  };

  static size_t round_up(size_t n) { return n == 0 ? kAlign : (n + kAlign - 1) & ~(kAlign - 1); }
  size_t cache_limit() const { return std::max<size_t>(64u << 20, st_.reserved_bytes / 4); }

  uint32_t stream_index(StreamId id) {
    if (last_stream_ < streams_.size() && streams_[last_stream_]->id == id) return last_stream_;
    for (uint32_t i = 0; i < streams_.size(); ++i)
      if (streams_[i]->id == id) return last_stream_ = i;
    streams_.push_back(std::make_unique<Stream>());
    streams_.back()->id = id;
    return last_stream_ = static_cast<uint32_t>(streams_.size() - 1);
  }

  void note_alloc(size_t rs, bool fresh) {
    st_.allocated_bytes += rs;
    st_.allocated_peak = std::max(st_.allocated_peak, st_.allocated_bytes);
    if (fresh) {
      st_.active_bytes += rs;
      st_.active_peak = std::max(st_.active_peak, st_.active_bytes);
    }
  }
  void note_free(size_t rs) { st_.allocated_bytes -= rs; }
  // Bytes leave "active" when they leave the stream caches for the free index.
  void note_inactive(size_t rs) { st_.active_bytes -= rs; }

  // ---- small objects -----------------------------------------------------

  int malloc_small(size_t rs, uint32_t si, void** out) {
    uint32_t cls = static_cast<uint32_t>(rs / kAlign - 1);
    Stream& s = *streams_[si];
    Slab* sl = s.partial[cls];
    if (!sl) {
      int r = new_slab(si, cls, &sl);
      if (r != kOk) return r;
    } else {
      ++st_.fast_allocs;
    }
    if (sl->free_bits == sl->full_mask()) --s.empty_listed[cls];
    unsigned idx = __builtin_ctzll(sl->free_bits);
    sl->free_bits &= ~(1ull << idx);
    if (!sl->free_bits) unlink(s, sl);
    uintptr_t p = sl->addr + idx * sl->obj_bytes();
    live_.insert(p, reinterpret_cast<uintptr_t>(sl) | 1);
    note_alloc(rs, false);
    *out = reinterpret_cast<void*>(p);
    return kOk;
  }

  int free_small(uintptr_t p, Slab* sl) {
    note_free(sl->obj_bytes());
    live_.erase(p);
    if (!small_uses_.empty()) {
      auto it = small_uses_.find(p);
      if (it != small_uses_.end()) {
        Fence f = record_uses(sl->stream, it->second);
        small_uses_.erase(it);
        streams_[sl->stream]->deferred.push_back({sl, p, std::move(f)});
        return kOk;
      }
    }
    return_object(sl, p);
    return kOk;
  }

  void return_object(Slab* sl, uintptr_t p) {
    Stream& s = *streams_[sl->stream];
    unsigned idx = static_cast<unsigned>((p - sl->addr) / sl->obj_bytes());
    if (!sl->listed) link(s, sl);
    sl->free_bits |= 1ull << idx;
    if (sl->free_bits != sl->full_mask()) return;
    // Keep one empty slab per class listed for reuse; retire the rest so the
    // next cache flush gives their bytes back to the free index.
    if (s.empty_listed[sl->cls] == 0) {
      ++s.empty_listed[sl->cls];
      return;
    }
    unlink(s, sl);
    s.retired.push_back(sl);
    s.cached_bytes += sl->bytes();
    st_.cached_bytes += sl->bytes();
  }

  int new_slab(uint32_t si, uint32_t cls, Slab** out) {
    drain_deferred(si);
    Stream& s = *streams_[si];
    if (s.partial[cls]) {  // a deferred object came back
      *out = s.partial[cls];
      return kOk;
    }
    size_t obj = (cls + 1) * kAlign;
    uint32_t nobj = static_cast<uint32_t>(std::min<size_t>(64, kSlabTarget / obj));
    uintptr_t addr;
    int r = place(nobj * obj, si, &addr);
    if (r != kOk) return r;
    Slab* sl = new Slab{addr, cls, nobj, si, 0, nullptr, nullptr, false};
    sl->free_bits = sl->full_mask();
    st_.active_bytes += sl->bytes();
    st_.active_peak = std::max(st_.active_peak, st_.active_bytes);
    link(s, sl);
    ++s.empty_listed[cls];
    *out = sl;
    return kOk;
  }

  void link(Stream& s, Slab* sl) {
    sl->prev = nullptr;
    sl->next = s.partial[sl->cls];
    if (sl->next) sl->next->prev = sl;
    s.partial[sl->cls] = sl;
    sl->listed = true;
  }
  void unlink(Stream& s, Slab* sl) {
    if (sl->prev) sl->prev->next = sl->next;
    else s.partial[sl->cls] = sl->next;
    if (sl->next) sl->next->prev = sl->prev;
    sl->prev = sl->next = nullptr;
    sl->listed = false;
  }

  void drain_deferred(uint32_t si) {
    Stream& s = *streams_[si];
    for (size_t i = 0; i < s.deferred.size();) {
      if (fence_done(s.deferred[i].fence, si)) {
        return_object(s.deferred[i].slab, s.deferred[i].addr);
        s.deferred[i] = std::move(s.deferred.back());
        s.deferred.pop_back();
      } else {
        ++i;
      }
    }
  }

  // ---- large blocks --------------------------------------------------------

  int malloc_large(size_t rs, uint32_t si, void** out) {
    // A miss ends the run of sizes this stream's cache was serving: its
    // blocks go back to the free index before placement, so they coalesce
    // and best fit sees them. Keeping them cached across misses would pin
    // bytes that a growing tensor (a DynamicCache's K/V) never asks for
    // again, and cost chunks at the next peak.
    if (streams_[si]->cached_bytes) flush_stream(si);
    uintptr_t addr;
    int r = place(rs, si, &addr);
    if (r != kOk) return r;
    Block* b = new_block();
    *b = Block{addr, rs, si, Block::kLive, {}, nullptr};
    live_.insert(addr, reinterpret_cast<uintptr_t>(b));
    note_alloc(rs, true);
    *out = reinterpret_cast<void*>(addr);
    return kOk;
  }

  Block* new_block() {
    if (!spare_blocks_.empty()) {
      Block* b = spare_blocks_.back();
      spare_blocks_.pop_back();
      return b;
    }
    block_store_.emplace_back(new Block());
    return block_store_.back().get();
  }
  void drop_block(Block* b) {
    b->uses.clear();
    spare_blocks_.push_back(b);
  }

  // ---- placement: best fit in VA, chunks mapped under used bytes -----------

  // Finds VA for `bytes` usable by stream si and maps chunks under it.
  // Escalates: (0) place without growing; (1) flush every stream cache and
  // retry, growing if needed; (2) wait for outstanding fences and retry.
  int place(size_t bytes, uint32_t si, uintptr_t* out) {
    for (int attempt = 0; attempt < 3; ++attempt) {
      // While caches or fenced splits hide free bytes, try without taking
      // chunks from the pool first (the arena's idle chunks may move).
      bool may_grow = attempt > 0 || (!any_cached() && fenced_splits_ == 0);
      Fence seg_fence;
      uintptr_t addr = take_range(bytes, si, &seg_fence);
      if (addr) {
        int r = map_range(addr, bytes, si, may_grow);
        if (r == kOk) {
          *out = addr;
          return kOk;
        }
        add_free(addr, bytes, seg_fence);  // undo the carve
        if (r != kOutOfMemory && r != kNeedGrowth) return r;
      }
      if (attempt == 0) {
        flush_all();
        coalesce_free();
      }
      if (attempt == 1) {
        wait_all_fences();
        coalesce_free();
      }
    }
    ++st_.ooms;
    return kOutOfMemory;
  }

  static constexpr int kNeedGrowth = 100;

  bool any_cached() const { return st_.cached_bytes > 0; }

  // Placement: best fit, except that physical memory, not VA, is what a
  // placement costs. Among the smallest few segments this stream may use
  // now, take the one whose bytes land on the fewest VA chunks no live byte
  // uses yet (each new one costs a chunk, idle or from the pool); ties go to
  // the smaller segment. Blocks go at a segment's low end: placing at the
  // high end as well was measured to fragment more on growing-KV traces.
  uintptr_t take_range(size_t bytes, uint32_t si, Fence* fence_out) {
    constexpr int kCandidates = 16;
    auto chosen = by_size_.end();
    size_t chosen_cost = SIZE_MAX;
    int seen = 0;
    for (auto it = by_size_.lower_bound({bytes, 0}); it != by_size_.end() && seen < kCandidates; ++it) {
      if (!fence_done(by_addr_.at(it->second).fence, si)) continue;
      ++seen;
      size_t cost = unused_under(it->second, bytes);
      if (cost < chosen_cost) {
        chosen = it;
        chosen_cost = cost;
        if (cost == 0) break;
      }
    }
    if (chosen == by_size_.end()) return 0;
    uintptr_t addr = chosen->second;
    size_t size = chosen->first;
    auto ait = by_addr_.find(addr);
    *fence_out = std::move(ait->second.fence);
    by_addr_.erase(ait);
    by_size_.erase(chosen);
    if (size > bytes) insert_free(addr + bytes, size - bytes, *fence_out);
    return addr;
  }

  // VA chunks under [addr, addr+bytes) that no live or cached byte uses.
  size_t unused_under(uintptr_t addr, size_t bytes) const {
    size_t n = 0;
    for (size_t i = slot_of(addr), e = slot_of(addr + bytes - 1); i <= e; ++i) n += slots_[i].users == 0;
    return n;
  }
  size_t slot_of(uintptr_t a) const { return (a - base_) / chunk_; }
  uintptr_t slot_va(size_t i) const { return base_ + i * chunk_; }

  // Marks [addr, addr+bytes) used and maps a chunk under every unmapped VA
  // chunk in it: idle chunks of the arena first (moved here), then the pool.
  // Without may_grow, fails with kNeedGrowth instead of taking pool chunks.
  int map_range(uintptr_t addr, size_t bytes, uint32_t si, bool may_grow) {
    size_t first = slot_of(addr), last = slot_of(addr + bytes - 1);
    std::vector<size_t> need;
    for (size_t i = first; i <= last; ++i) {
      Slot& sl = slots_[i];
      ++sl.users;
      set_busy(sl);
      if (sl.chunk < 0) need.push_back(i);
    }
    if (need.empty()) return kOk;

    // Chunks to move here from idle VA. Their old fences must be done on
    // every stream, including si: stream order covers reusing bytes, not
    // unmapping the VA a queued kernel still reads through.
    std::vector<size_t> movable;
    for (size_t k = idle_.size(); k-- > 0 && movable.size() < need.size();) {
      size_t i = idle_[k];
      Slot& sl = slots_[i];
      if (sl.idle && sl.chunk >= 0 && fence_done(sl.fence, kAnyStream) &&
          std::find(movable.begin(), movable.end(), i) == movable.end())
        movable.push_back(i);
    }
    size_t from_pool = need.size() - movable.size();
    std::vector<ChunkId> ids(from_pool);
    if (from_pool && (!may_grow || pool_->acquire(owner_, from_pool, ids.data()) != kOk)) {
      unmark(first, last);
      return may_grow ? kOutOfMemory : kNeedGrowth;
    }
    for (size_t i : movable) {
      Slot& old = slots_[i];
      ids.push_back(static_cast<ChunkId>(old.chunk));
      be_->unmap(slot_va(i), chunk_);
      old.chunk = -1;
      set_busy(old);
      old.fence.clear();
      ++st_.chunk_unmaps;
      ++st_.chunk_moves;
    }
    st_.reserved_bytes += from_pool * chunk_;
    st_.reserved_peak = std::max(st_.reserved_peak, st_.reserved_bytes);
    // Map, then set access once per contiguous run.
    for (size_t k = 0; k < need.size(); ++k) {
      int r = be_->map(slot_va(need[k]), chunk_, pool_->handle(ids[k]));
      if (r == kOk) {
        slots_[need[k]].chunk = ids[k];
        ++st_.chunk_maps;
        continue;
      }
      // Undo: unmap what this call mapped, give every chunk it took back.
      for (size_t j = 0; j < k; ++j) {
        be_->unmap(slot_va(need[j]), chunk_);
        slots_[need[j]].chunk = -1;
        ++st_.chunk_unmaps;
      }
      pool_->release(owner_, ids.size(), ids.data());
      st_.reserved_bytes -= ids.size() * chunk_;
      unmark(first, last);
      return r == kInjectedFault ? kOutOfMemory : r;
    }
    for (size_t k = 0; k < need.size();) {
      size_t j = k;
      while (j + 1 < need.size() && need[j + 1] == need[j] + 1) ++j;
      be_->set_access(slot_va(need[k]), (j - k + 1) * chunk_);
      k = j + 1;
    }
    return kOk;
  }

  void unmark(size_t first, size_t last) {
    for (size_t i = first; i <= last; ++i) {
      Slot& sl = slots_[i];
      if (--sl.users == 0 && sl.chunk >= 0) make_idle(i);
    }
  }
  void make_idle(size_t i) {
    slots_[i].idle = true;
    ++n_idle_;
    idle_.push_back(i);
    if (idle_.size() > 2 * n_idle_ + 64) compact_idle();
  }
  void set_busy(Slot& sl) {
    if (sl.idle) --n_idle_;
    sl.idle = false;
  }
  // idle_ is a stack with lazy deletion; this drops stale and duplicate entries.
  void compact_idle() {
    std::vector<size_t> keep;
    for (size_t i : idle_)
      if (slots_[i].idle) keep.push_back(i);
    std::sort(keep.begin(), keep.end());
    keep.erase(std::unique(keep.begin(), keep.end()), keep.end());
    idle_.swap(keep);
  }

  // Returns [addr, addr+bytes) to the free index with its fence and drops
  // its users from the VA chunks under it.
  void free_range(uintptr_t addr, size_t bytes, const Fence& fence) {
    for (size_t i = slot_of(addr), e = slot_of(addr + bytes - 1); i <= e; ++i) {
      Slot& sl = slots_[i];
      merge_fence(sl.fence, fence);
      if (--sl.users == 0 && sl.chunk >= 0) make_idle(i);
    }
    note_inactive(bytes);
    add_free(addr, bytes, fence);
  }

  // Inserts a free segment, coalescing with free neighbours whose pending
  // fences are on the same streams. Segments fenced differently stay apart:
  // merging would spread one stream's fence over bytes other streams may use
  // now (a small flushed block would poison the whole free VA behind it).
  // Split pairs are counted and re-joined by coalesce_free() once their
  // fences complete.
  void add_free(uintptr_t addr, size_t bytes, Fence fence) {
    prune(fence);
    auto next = by_addr_.find(addr + bytes);
    if (next != by_addr_.end()) {
      if (joinable(fence, next->second.fence)) {
        by_size_.erase({next->second.size, next->first});
        bytes += next->second.size;
        merge_fence(fence, next->second.fence);
        by_addr_.erase(next);
      } else {
        ++fenced_splits_;
      }
    }
    auto prev = by_addr_.lower_bound(addr);
    if (prev != by_addr_.begin()) {
      --prev;
      if (prev->first + prev->second.size == addr) {
        if (joinable(fence, prev->second.fence)) {
          by_size_.erase({prev->second.size, prev->first});
          addr = prev->first;
          bytes += prev->second.size;
          merge_fence(fence, prev->second.fence);
          by_addr_.erase(prev);
        } else {
          ++fenced_splits_;
        }
      }
    }
    insert_free(addr, bytes, std::move(fence));
  }
  // Drops completed entries, so a finished fence no longer blocks a merge.
  void prune(Fence& f) {
    f.erase(std::remove_if(f.begin(), f.end(),
                           [&](const FenceEntry& e) { return stream_done(e.stream, e.seq); }),
            f.end());
  }
  bool joinable(const Fence& a, Fence& b) {
    prune(b);
    if (a.size() != b.size()) return false;
    for (const FenceEntry& x : a) {
      bool found = false;
      for (const FenceEntry& y : b) found |= x.stream == y.stream;
      if (!found) return false;
    }
    return true;
  }
  // Re-joins free neighbours left apart by add_free whose fences have since
  // completed. Slow path only: before the arena grows.
  void coalesce_free() {
    if (fenced_splits_ == 0) return;
    fenced_splits_ = 0;
    for (auto it = by_addr_.begin(); it != by_addr_.end();) {
      auto next = std::next(it);
      if (next == by_addr_.end()) break;
      if (it->first + it->second.size != next->first) {
        it = next;
        continue;
      }
      prune(it->second.fence);
      if (!joinable(it->second.fence, next->second.fence)) {
        ++fenced_splits_;
        it = next;
        continue;
      }
      by_size_.erase({it->second.size, it->first});
      by_size_.erase({next->second.size, next->first});
      it->second.size += next->second.size;
      merge_fence(it->second.fence, next->second.fence);
      by_addr_.erase(next);
      by_size_.insert({it->second.size, it->first});
    }
  }
  void insert_free(uintptr_t addr, size_t bytes, Fence fence) {
    by_addr_[addr] = Seg{bytes, std::move(fence)};
    by_size_.insert({bytes, addr});
  }

  // ---- caches ----------------------------------------------------------------

  // Moves one stream's cached blocks and retired slabs to the free index,
  // fenced by one event on that stream.
  void flush_stream(uint32_t si) {
    Stream& s = *streams_[si];
    drain_deferred(si);
    if (s.cached_bytes == 0) return;
    Fence f{{si, record(si)}};
    for (auto& [size, head] : s.bins) {
      for (Block* b = head; b;) {
        Block* next = b->next;
        live_.erase(b->addr);
        --cached_blocks_;
        free_range(b->addr, b->size, f);
        drop_block(b);
        b = next;
      }
    }
    s.bins.clear();
    for (Slab* sl : s.retired) {
      free_range(sl->addr, sl->bytes(), f);
      delete sl;
    }
    s.retired.clear();
    st_.cached_bytes -= s.cached_bytes;
    s.cached_bytes = 0;
    ++st_.cache_flushes;
  }
  void flush_all() {
    for (uint32_t i = 0; i < streams_.size(); ++i) flush_stream(i);
  }

  // Unmaps up to `want` idle chunks whose fences are done and gives them to
  // the pool, in one batch.
  size_t release_idle(size_t want) {
    std::vector<ChunkId> ids;
    std::vector<size_t> keep;
    for (size_t i : idle_) {
      Slot& sl = slots_[i];
      if (!sl.idle || sl.chunk < 0) continue;  // stale entry
      if (ids.size() >= want || !fence_done(sl.fence, kAnyStream)) {
        keep.push_back(i);
        continue;
      }
      be_->unmap(slot_va(i), chunk_);
      ids.push_back(static_cast<ChunkId>(sl.chunk));
      sl.chunk = -1;
      set_busy(sl);
      sl.fence.clear();
      ++st_.chunk_unmaps;
    }
    idle_.swap(keep);
    compact_idle();
    if (!ids.empty()) pool_->release(owner_, ids.size(), ids.data());
    st_.reserved_bytes -= ids.size() * chunk_;
    return ids.size();
  }

  // Called by the pool when another owner runs short. Never blocks.
  static size_t reclaim_hook(void* ctx, size_t want) {
    Arena* a = static_cast<Arena*>(ctx);
    std::unique_lock<std::mutex> g(a->mu_, std::try_to_lock);
    if (!g.owns_lock()) return 0;
    a->flush_all();
    return a->release_idle(want);
  }

  // ---- streams and fences -----------------------------------------------------

  uint64_t record(uint32_t si) {
    Stream& s = *streams_[si];
    EventHandle e;
    if (be_->event_record(s.id, &e) != kOk) {
      // No event: fall back to waiting for what is outstanding on the stream
      // now, which makes the fence trivially complete.
      wait_stream(si, s.next_seq);
      return 0;
    }
    s.pending.push_back({++s.next_seq, e});
    return s.next_seq;
  }

  Fence record_uses(uint32_t alloc_stream, const Fence& uses) {
    Fence f{{alloc_stream, record(alloc_stream)}};
    for (const FenceEntry& u : uses) f.push_back({u.stream, record(u.stream)});
    return f;
  }
  static void add_use(Fence& uses, uint32_t si) {
    for (const FenceEntry& e : uses)
      if (e.stream == si) return;
    uses.push_back({si, 0});
  }

  bool stream_done(uint32_t si, uint64_t seq) {
    Stream& s = *streams_[si];
    while (seq > s.completed && !s.pending.empty() && be_->event_done(s.pending.front().second)) {
      s.completed = s.pending.front().first;
      be_->event_destroy(s.pending.front().second);
      s.pending.pop_front();
    }
    return seq <= s.completed;
  }
  void wait_stream(uint32_t si, uint64_t seq) {
    Stream& s = *streams_[si];
    while (seq > s.completed && !s.pending.empty()) {
      be_->event_wait(s.pending.front().second);
      s.completed = s.pending.front().first;
      be_->event_destroy(s.pending.front().second);
      s.pending.pop_front();
    }
  }
  // A fence entry on the stream that will use the memory is ignored: that
  // stream runs its work in order.
  bool fence_done(const Fence& f, uint32_t for_stream) {
    for (const FenceEntry& e : f)
      if (e.stream != for_stream && !stream_done(e.stream, e.seq)) return false;
    return true;
  }
  // Only on the way to out-of-memory: wait (event by event, never a
  // device-wide sync) for everything recorded so far.
  void wait_all_fences() {
    for (uint32_t i = 0; i < streams_.size(); ++i) wait_stream(i, streams_[i]->next_seq);
    for (uint32_t i = 0; i < streams_.size(); ++i) drain_deferred(i);
  }

  ChunkPool* pool_;
  Backend* be_;
  size_t chunk_ = 0, va_bytes_ = 0;
  uintptr_t base_ = 0;
  int owner_ = -1;
  std::mutex mu_;
  ArenaStats st_ = {};
  std::vector<std::unique_ptr<Stream>> streams_;
  uint32_t last_stream_ = 0;
  size_t fenced_splits_ = 0;  // free neighbours kept apart by differing fences (an upper bound)
  size_t cached_blocks_ = 0;  // large blocks in live_ that are cached, not live
  PtrMap live_;  // live small objects (Slab*|1) and live or cached large blocks (Block*)
  std::unordered_map<uintptr_t, Fence> small_uses_;
  std::vector<std::unique_ptr<Block>> block_store_;
  std::vector<Block*> spare_blocks_;
  std::vector<Slot> slots_;
  std::vector<size_t> idle_;  // slots that went idle; entries may be stale (lazy deletion)
  size_t n_idle_ = 0;         // slots with idle == true
  std::map<uintptr_t, Seg> by_addr_;
  std::set<std::pair<size_t, uintptr_t>> by_size_;
};

// ---- checks and teardown (cold) -------------------------------------------

inline std::string Arena::validate() {
  std::lock_guard<std::mutex> g(mu_);
  char buf[256];
  // Every byte of the reservation is in exactly one of: a free segment, a
  // large block (live or cached), a slab.
  std::vector<std::pair<uintptr_t, size_t>> pieces;
  for (auto& [a, seg] : by_addr_) pieces.push_back({a, seg.size});
  std::set<Slab*> slabs;
  size_t live_bytes = 0, cached = 0;
  std::string err;
  live_.for_each([&](uintptr_t p, uintptr_t v) {
    if (v & 1) {
      Slab* sl = reinterpret_cast<Slab*>(v & ~uintptr_t(1));
      slabs.insert(sl);
      live_bytes += sl->obj_bytes();
      unsigned idx = static_cast<unsigned>((p - sl->addr) / sl->obj_bytes());
      if (p != sl->addr + idx * sl->obj_bytes() || (sl->free_bits >> idx & 1))
        err = "a live small object is marked free in its slab";
    } else {
      Block* b = reinterpret_cast<Block*>(v);
      pieces.push_back({b->addr, b->size});
      if (b->state == Block::kLive) live_bytes += b->size;
      else cached += b->size;
    }
  });
  for (auto& s : streams_) {
    for (int c = 0; c < (int)kSmallClasses; ++c)
      for (Slab* sl = s->partial[c]; sl; sl = sl->next) slabs.insert(sl);
    for (Slab* sl : s->retired) slabs.insert(sl), cached += sl->bytes();
    for (auto& d : s->deferred) slabs.insert(d.slab);
  }
  if (!err.empty()) return err;
  for (Slab* sl : slabs) pieces.push_back({sl->addr, sl->bytes()});
  std::sort(pieces.begin(), pieces.end());
  uintptr_t cursor = base_;
  for (auto& [a, n] : pieces) {
    if (a != cursor || n == 0 || n % kAlign) {
      snprintf(buf, sizeof buf, "VA not tiled at %#lx (piece %#lx+%zu): overlap or hole",
               (unsigned long)cursor, (unsigned long)a, n);
      return buf;
    }
    cursor = a + n;
  }
  if (cursor != base_ + va_bytes_) return "VA tiling does not reach the end of the reservation";
  if (live_bytes != st_.allocated_bytes) {
    snprintf(buf, sizeof buf, "allocated_bytes %lu != live bytes %zu",
             (unsigned long)st_.allocated_bytes, live_bytes);
    return buf;
  }
  size_t cached_total = 0;
  for (auto& s : streams_) cached_total += s->cached_bytes;
  if (cached != cached_total || cached != st_.cached_bytes) return "cached byte counters disagree";
  // Users per VA chunk equal the used pieces over it; mapped iff users or idle.
  std::vector<uint32_t> users(slots_.size(), 0);
  std::set<uintptr_t> free_starts;
  for (auto& [a, seg] : by_addr_) free_starts.insert(a);
  for (auto& [a, n] : pieces) {
    if (free_starts.count(a) && by_addr_.at(a).size == n) continue;
    for (size_t i = slot_of(a), e = slot_of(a + n - 1); i <= e; ++i) ++users[i];
  }
  size_t mapped = 0;
  std::set<int64_t> chunks;
  for (size_t i = 0; i < slots_.size(); ++i) {
    const Slot& sl = slots_[i];
    if (sl.users != users[i]) {
      snprintf(buf, sizeof buf, "VA chunk %zu: users %u, counted %u", i, sl.users, users[i]);
      return buf;
    }
    if (sl.users && sl.chunk < 0) {
      snprintf(buf, sizeof buf, "VA chunk %zu is used but not mapped", i);
      return buf;
    }
    if (sl.chunk >= 0) {
      ++mapped;
      if (!chunks.insert(sl.chunk).second) return "a chunk is mapped at two VAs";
      if (!sl.users && !sl.idle) return "a mapped chunk with no users is not idle";
    }
  }
  if (mapped * chunk_ != st_.reserved_bytes) return "reserved_bytes disagrees with mapped chunks";
  auto snap = pool_->snapshot();
  if (snap.owners[owner_].held != mapped) {
    snprintf(buf, sizeof buf, "pool says the arena holds %zu chunks, the arena maps %zu",
             snap.owners[owner_].held, mapped);
    return buf;
  }
  if (!pool_->ledger_balanced()) return "pool ledger does not balance";
  return "";
}

inline size_t Arena::teardown() {
  if (!base_) return 0;
  size_t leaked = 0;
  {
    std::lock_guard<std::mutex> g(mu_);
    std::set<Slab*> slabs;
    live_.for_each([&](uintptr_t, uintptr_t v) {
      if (v & 1) {
        slabs.insert(reinterpret_cast<Slab*>(v & ~uintptr_t(1)));
        ++leaked;
      } else if (reinterpret_cast<Block*>(v)->state == Block::kLive) {
        ++leaked;
      }
    });
    for (auto& s : streams_) {
      for (int c = 0; c < (int)kSmallClasses; ++c)
        for (Slab* sl = s->partial[c]; sl; sl = sl->next) slabs.insert(sl);
      for (Slab* sl : s->retired) slabs.insert(sl);
      for (auto& d : s->deferred) slabs.insert(d.slab);
      for (auto& p : s->pending) {
        be_->event_wait(p.second);
        be_->event_destroy(p.second);
      }
    }
    for (Slab* sl : slabs) delete sl;
    std::vector<ChunkId> ids;
    for (size_t i = 0; i < slots_.size(); ++i)
      if (slots_[i].chunk >= 0) {
        be_->unmap(slot_va(i), chunk_);
        ids.push_back(static_cast<ChunkId>(slots_[i].chunk));
      }
    if (!ids.empty()) pool_->release(owner_, ids.size(), ids.data());
    pool_->unregister_owner(owner_);
    be_->release(base_, va_bytes_);
    base_ = 0;
  }
  return leaked;
}

}  // namespace ellm

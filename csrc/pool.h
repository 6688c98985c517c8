// pool.h: the chunk pool. All physical chunks of one device, one budget, one
// ledger. A chunk is either free (held by the pool, created and ready to map)
// or owned by exactly one owner (the torch arena, a KV space, ...).
//
// Ledger invariant, checked by tests after every step:
//     created == free + sum(owner.held)        and  created <= budget
//
// Physical handles are created ahead of need, in batches, and recycled: the
// driver's create call (~190 us on CUDA) is never on an allocation fast path.
//
// Reclaim: when an owner asks for more chunks than are free and the budget is
// spent, the pool asks the other owners, through C callbacks, to give back
// chunks that hold no live data. Callbacks run without the pool lock held and
// must not block on their own lock (they try_lock and give nothing if busy),
// so two owners reclaiming from each other cannot deadlock. Nothing here ever
// calls into Python.
//
// Owner lifetime: an owner (a KV space, the arena) is destroyed right after
// unregister_owner() returns, so no callback may run on it after that. Every
// callback call is counted in the owner's `in_flight` under the pool lock
// before the lock is dropped; unregister_owner() clears the hook (no new call
// can start) and then waits until in_flight is 0. An owner may hold its own
// lock while unregistering: its callback only try_locks it, gives nothing and
// returns, so the wait ends. Two consequences, one enforced, one stated:
//  * a callback must not unregister its own owner (it would wait for itself):
//    unregister_owner() refuses that, knowing from a per-thread list which
//    callbacks the calling thread is running;
//  * a callback must not unregister any other owner either (two threads, each
//    in a callback, each unregistering the other's owner, would wait for each
//    other forever); no callback in this project does, and none may.
// The count is dropped by a scope guard, so even a callback that throws
// leaves it balanced and cannot make a later unregister wait forever.
//
// Misuse through the C API (unknown owners, chunk ids out of range or held by
// another owner, a budget below the chunks in use) is refused with
// kInvalidArgument before anything changes: the ledger stays balanced.
#pragma once

#include <algorithm>
#include <condition_variable>
#include <cstring>
#include <mutex>
#include <string>
#include <vector>

#include "backend.h"

namespace ellm {

using ChunkId = uint32_t;
// Gives back up to `want` chunks to the pool (via ChunkPool::release) and
// returns how many it gave.
using ReclaimFn = size_t (*)(void* ctx, size_t want);

constexpr int kNoOwner = -1;

class ChunkPool {
 public:
  struct OwnerStats {
    std::string name;
    size_t held = 0, peak = 0;
    size_t received = 0;  // chunks acquired that another owner held last
    size_t given = 0;     // chunks this owner held last that another owner then acquired
    size_t reclaimed = 0; // chunks given back through the reclaim callback
    bool active = false;
  };

  // Chunks come from `source`, the backend's device memory unless given
  // (the host tier's pool draws on pinned host slabs).
  ChunkPool(Backend* be, size_t chunk_bytes, size_t budget_bytes, size_t prealloc_bytes,
            ChunkSource* source = nullptr)
      : be_(be), src_(source ? source : be), chunk_bytes_(chunk_bytes), budget_chunks_(budget_bytes / chunk_bytes) {
    std::lock_guard<std::mutex> g(mu_);
    grow_locked(std::min(budget_chunks_, prealloc_bytes / chunk_bytes));
  }
  ~ChunkPool() {
    for (Chunk& c : chunks_)
      if (c.created) src_->destroy_chunk(c.handle, chunk_bytes_);
  }

  Backend* backend() const { return be_; }
  size_t chunk_bytes() const { return chunk_bytes_; }

  int register_owner(const char* name, ReclaimFn fn, void* ctx) {
    std::lock_guard<std::mutex> g(mu_);
    owners_.push_back({});
    OwnerStats& o = owners_.back();
    o.name = name ? name : "";
    o.active = true;
    hooks_.push_back({fn, ctx});
    in_flight_.push_back(0);
    return static_cast<int>(owners_.size() - 1);
  }
  bool is_active_owner(int owner) {
    std::lock_guard<std::mutex> g(mu_);
    return active_locked(owner);
  }

  // Whether the calling thread is running `owner`'s reclaim callback now.
  bool in_own_callback(int owner) const {
    for (const CallbackFrame* f = t_callbacks_; f; f = f->outer)
      if (f->pool == this && f->owner == owner) return true;
    return false;
  }

  // An owner leaves only after giving every chunk back; see "Owner lifetime".
  int unregister_owner(int owner) {
    if (in_own_callback(owner)) return kInvalidArgument;  // the wait below would never end
    std::unique_lock<std::mutex> g(mu_);
    if (!active_locked(owner) || owners_[owner].held != 0) return kInvalidArgument;
    owners_[owner].active = false;
    hooks_[owner] = {nullptr, nullptr};
    callbacks_done_.wait(g, [&] { return in_flight_[owner] == 0; });
    return kOk;
  }

  // All or nothing: fills `out` with n chunk ids owned by `owner`, or takes
  // none and returns kOutOfMemory.
  int acquire(int owner, size_t n, ChunkId* out) {
    if (!is_active_owner(owner)) return kInvalidArgument;
    size_t short_by = 0;
    for (int round = 0;; ++round) {
      {
        std::lock_guard<std::mutex> g(mu_);
        if (!active_locked(owner)) return kInvalidArgument;  // unregistered meanwhile
        size_t avail = available_locked(owner);
        if (n <= avail) {
          if (n > free_.size()) grow_locked(std::min(avail, std::max(n - free_.size(), kGrowBatch)));
          if (n <= free_.size()) {
            take_locked(owner, n, out);
            return kOk;
          }
        }
        if (round == 1) {
          ++failed_acquires_;
          return kOutOfMemory;
        }
        // Reclaim enough that n fit on top of the headroom kept for others.
        short_by = n > avail ? n - avail : n - free_.size();  // else a create failed
      }
      reclaim_from_others(owner, short_by);
    }
  }

  size_t available(int owner) {
    std::lock_guard<std::mutex> g(mu_);
    return available_locked(owner);
  }

  // Keeps `chunks` of the budget (free or not yet created) for `owner` alone:
  // other owners' acquires cannot take them. The KV cache uses this to leave
  // headroom for the next step's activations.
  void set_headroom(int owner, size_t chunks) {
    std::lock_guard<std::mutex> g(mu_);
    headroom_owner_ = owner;
    headroom_ = chunks;
  }

  void release(int owner, size_t n, const ChunkId* ids) {
    std::lock_guard<std::mutex> g(mu_);
    release_locked(owner, n, ids);
  }

  // release() for callers that are not trusted (the C API): every id must be
  // a created chunk held by `owner`, listed once; otherwise nothing changes.
  int release_checked(int owner, size_t n, const ChunkId* ids, std::string* why) {
    std::lock_guard<std::mutex> g(mu_);
    if (!active_locked(owner)) return *why = "no active owner " + std::to_string(owner), kInvalidArgument;
    size_t i = 0;
    for (; i < n; ++i) {
      if (ids[i] >= chunks_.size() || !chunks_[ids[i]].created) {
        *why = "chunk " + std::to_string(ids[i]) + " does not exist";
        break;
      }
      if (chunks_[ids[i]].owner != owner) {  // another owner's, free, or listed twice
        *why = "chunk " + std::to_string(ids[i]) + " is not held by owner " + std::to_string(owner) +
               (chunks_[ids[i]].owner == kReleasing ? " (listed twice)" : "");
        break;
      }
      chunks_[ids[i]].owner = kReleasing;
    }
    for (size_t j = 0; j < i; ++j) chunks_[ids[j]].owner = owner;  // checked: undo the marks
    if (i < n) return kInvalidArgument;
    release_locked(owner, n, ids);
    return kOk;
  }

  // Under the lock: a growing pool may reallocate chunks_ meanwhile (found by
  // ThreadSanitizer). Called on mapping paths only, never on a cached malloc.
  ChunkHandle handle(ChunkId id) {
    std::lock_guard<std::mutex> g(mu_);
    return chunks_[id].handle;
  }
  bool chunk_exists(ChunkId id) {
    std::lock_guard<std::mutex> g(mu_);
    return id < chunks_.size() && chunks_[id].created;
  }

  // Destroys free chunks beyond `keep`, giving the memory back to the device.
  size_t trim(size_t keep) {
    std::lock_guard<std::mutex> g(mu_);
    return trim_locked(keep);
  }

  // A budget below the chunks created is met by destroying free chunks; one
  // below the chunks owners hold is refused (they are in use).
  int set_budget(size_t bytes) {
    std::lock_guard<std::mutex> g(mu_);
    size_t want = bytes / chunk_bytes_, held = created_ - free_.size();
    if (want < held) return kInvalidArgument;
    if (want < created_) trim_locked(want - held);
    budget_chunks_ = want;
    return kOk;
  }
  size_t held_chunks() {
    std::lock_guard<std::mutex> g(mu_);
    return created_ - free_.size();
  }

  // Asks other owners (not `owner`) for up to `want` chunks. A hook is
  // called only while counted in in_flight_ (see "Owner lifetime").
  size_t reclaim_from_others(int owner, size_t want) {
    std::vector<int> others;
    {
      std::lock_guard<std::mutex> g(mu_);
      for (size_t i = 0; i < hooks_.size(); ++i)
        if (static_cast<int>(i) != owner && hooks_[i].fn) others.push_back(static_cast<int>(i));
      ++reclaim_calls_;
    }
    size_t got = 0;
    for (int id : others) {
      if (got >= want) break;
      Hook h;
      {
        std::lock_guard<std::mutex> g(mu_);
        h = hooks_[id];
        if (!h.fn) continue;  // unregistered since the list was made
        ++in_flight_[id];
      }
      InFlight counted(this, id);  // from here until the callback returns (or throws)
      size_t n = h.fn(h.ctx, want - got);
      got += n;
      counted.reclaimed = n;
    }
    return got;
  }

  struct Snapshot {
    size_t chunk_bytes, budget_chunks, created, free, reclaim_calls, failed_acquires, creates;
    std::vector<OwnerStats> owners;
  };
  Snapshot snapshot() {
    std::lock_guard<std::mutex> g(mu_);
    return {chunk_bytes_, budget_chunks_, created_, free_.size(), reclaim_calls_, failed_acquires_,
            creates_, owners_};
  }
  // created == free + sum(held) and every chunk's owner field agrees.
  bool ledger_balanced() {
    std::lock_guard<std::mutex> g(mu_);
    size_t held = 0;
    for (auto& o : owners_) held += o.held;
    std::vector<size_t> by_owner(owners_.size(), 0);
    size_t free_marked = 0;
    for (auto& c : chunks_) {
      if (!c.created) continue;
      if (c.owner == kNoOwner) ++free_marked;
      else ++by_owner[c.owner];
    }
    for (size_t i = 0; i < owners_.size(); ++i)
      if (by_owner[i] != owners_[i].held) return false;
    return created_ == free_.size() + held && free_marked == free_.size() && created_ <= budget_chunks_;
  }

 private:
  static constexpr size_t kGrowBatch = 8;  // chunks created per slow-path growth
  struct Chunk {
    ChunkHandle handle = 0;
    int owner = kNoOwner, last_owner = kNoOwner;
    bool created = false;
  };
  struct Hook {
    ReclaimFn fn;
    void* ctx;
  };

  // One reclaim callback running on this thread (see "Owner lifetime").
  struct CallbackFrame {
    const ChunkPool* pool;
    int owner;
    const CallbackFrame* outer;
  };
  static inline thread_local const CallbackFrame* t_callbacks_ = nullptr;

  // Scope of one callback call: listed in t_callbacks_ while it runs, then
  // its in_flight_ count dropped (waking unregister_owner at zero).
  struct InFlight {
    ChunkPool* pool;
    CallbackFrame frame;
    size_t reclaimed = 0;
    InFlight(ChunkPool* p, int owner) : pool(p), frame{p, owner, t_callbacks_} { t_callbacks_ = &frame; }
    ~InFlight() {
      t_callbacks_ = frame.outer;
      std::lock_guard<std::mutex> g(pool->mu_);
      pool->owners_[frame.owner].reclaimed += reclaimed;
      if (--pool->in_flight_[frame.owner] == 0) pool->callbacks_done_.notify_all();
    }
    InFlight(const InFlight&) = delete;
    InFlight& operator=(const InFlight&) = delete;
  };

  static constexpr int kReleasing = -2;  // marks a chunk within release_checked()

  bool active_locked(int owner) const {
    return owner >= 0 && owner < static_cast<int>(owners_.size()) && owners_[owner].active;
  }
  void release_locked(int owner, size_t n, const ChunkId* ids) {
    for (size_t i = 0; i < n; ++i) {
      Chunk& c = chunks_[ids[i]];
      c.owner = kNoOwner;
      c.last_owner = owner;
      free_.push_back(ids[i]);
    }
    owners_[owner].held -= n;
  }
  size_t trim_locked(size_t keep) {
    size_t n = 0;
    while (free_.size() > keep) {
      Chunk& c = chunks_[free_.back()];
      free_.pop_back();
      src_->destroy_chunk(c.handle, chunk_bytes_);
      c.created = false;
      dead_.push_back(static_cast<ChunkId>(&c - chunks_.data()));
      --created_;
      ++n;
    }
    return n;
  }

  // Chunks `owner` may take now without reclaiming: free ones plus what the
  // budget still allows to create, less the headroom kept for another owner.
  size_t available_locked(int owner) const {
    size_t uncreated = budget_chunks_ > created_ ? budget_chunks_ - created_ : 0;
    size_t total = free_.size() + uncreated;
    if (owner != headroom_owner_) total = total > headroom_ ? total - headroom_ : 0;
    return total;
  }

  // Creates up to n chunks within the budget. A failed create (device full,
  // injected fault) just stops the growth: the caller sees a short pool.
  void grow_locked(size_t n) {
    n = std::min(n, budget_chunks_ > created_ ? budget_chunks_ - created_ : 0);
    for (size_t i = 0; i < n; ++i) {
      ChunkHandle h;
      if (src_->create_chunk(chunk_bytes_, &h) != kOk) break;
      ChunkId id;
      if (!dead_.empty()) {
        id = dead_.back();
        dead_.pop_back();
      } else {
        id = static_cast<ChunkId>(chunks_.size());
        chunks_.push_back({});
      }
      chunks_[id] = {h, kNoOwner, kNoOwner, true};
      free_.push_back(id);
      ++created_;
      ++creates_;
    }
  }
  void take_locked(int owner, size_t n, ChunkId* out) {
    OwnerStats& o = owners_[owner];
    for (size_t i = 0; i < n; ++i) {
      ChunkId id = free_.back();
      free_.pop_back();
      Chunk& c = chunks_[id];
      if (c.last_owner != kNoOwner && c.last_owner != owner) {
        ++o.received;
        ++owners_[c.last_owner].given;
      }
      c.owner = owner;
      out[i] = id;
    }
    o.held += n;
    o.peak = std::max(o.peak, o.held);
  }

  Backend* be_;
  ChunkSource* src_;
  const size_t chunk_bytes_;
  size_t budget_chunks_;
  std::mutex mu_;
  std::vector<Chunk> chunks_;
  std::vector<ChunkId> free_, dead_;
  std::vector<OwnerStats> owners_;
  std::vector<Hook> hooks_;
  std::vector<uint32_t> in_flight_;  // callbacks running, per owner
  std::condition_variable callbacks_done_;
  int headroom_owner_ = kNoOwner;
  size_t headroom_ = 0;
  size_t created_ = 0, creates_ = 0, reclaim_calls_ = 0, failed_acquires_ = 0;
};

}  // namespace ellm

// kv_stress.cpp: KV spaces created and destroyed, mapped, unmapped and
// reclaimed from 8 threads over one small host pool, through the C ABI.
//
// Half the threads own KV spaces: create one, map runs of pages, mark some
// reclaimable (so other owners may take them), unmap or leave them, destroy
// the space. The other half allocate from the arena until the pool refuses,
// which makes the pool call every other owner's reclaim callback, some of
// them on spaces being destroyed at that moment. Built with
// -fsanitize=address,undefined and with -fsanitize=thread by
// `make test-sanitize`: a callback reaching a destroyed space is a
// use-after-free report. Half the spaces turn zero fill on (the pool's
// shared read-only zero chunk under every chunkless page), so reclaim, unmap
// and destroy also put back and take off zero mappings, and the zero chunk
// is taken and given back by many threads. At the end the ledger must
// balance, and no space holds the zero chunk any more.
//
// Swap (the host tier): four more threads swap KV pages out to the pool's
// host tier and back while the others map, unmap, reclaim and squeeze. Two
// share one space (disjoint pages), two create and destroy spaces of their
// own, destroying them with pages swapped out or still swapping. Each
// writes a tag into its pages, swaps a random subset out, then finishes the
// swaps by waiting, by polling, not at all (the arena's reclaim may finish
// them), or drops a page while it is out (unmap), swaps the rest back in
// (retrying while the pool is short), waits for the copies and checks the
// bytes it wrote (three spots per page). At the end both tiers' ledgers
// balance and the host tier holds no chunk. The pool is 16 chunks larger
// than before the swappers came, so the others' pressure stays as it was.
//
// Usage: kv_stress [seconds]   (default 5)
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <thread>
#include <vector>

#include "../../csrc/c_api.h"

namespace {

constexpr size_t kChunk = 2u << 20;
std::atomic<bool> g_stop{false};
std::atomic<long> g_spaces{0}, g_maps{0}, g_reclaimed{0}, g_mallocs{0}, g_zero_filled{0};
std::atomic<long> g_swap_outs{0}, g_swap_ins{0}, g_swap_drops{0}, g_swap_checked{0}, g_swap_errors{0};
std::atomic<long> g_swap_refused{0}, g_swap_in_retries{0};
std::atomic<uint32_t> g_tag{0};

void kv_owner(ellm_pool* pool, unsigned seed) {
  std::mt19937 rng(seed);
  while (!g_stop.load()) {
    ellm_kv_space* s = ellm_kv_create(pool, "stress", 16);
    if (!s) continue;
    g_spaces++;
    if (rng() % 2 && ellm_kv_set_zero_fill(s, 1) == 0) g_zero_filled++;
    for (int round = 0; round < 4; ++round) {
      uint32_t first = rng() % 12, count = 1 + rng() % 4;
      if (ellm_kv_map(s, first, count) == 0) {
        g_maps++;
        for (uint32_t p = first; p < first + count; ++p)
          if (rng() % 2) ellm_kv_set_reclaimable(s, p, rng() % 3, 0);
      }
      uint32_t taken[16];
      g_reclaimed += static_cast<long>(ellm_kv_take_reclaimed(s, taken, 16));
      if (rng() % 3 == 0)
        for (uint32_t p = 0; p < 16; ++p)
          if (ellm_kv_state(s, p) == 1 || ellm_kv_state(s, p) == 2) ellm_kv_unmap(s, p, 0);
    }
    ellm_kv_destroy(s);  // while other threads may be reclaiming from it
  }
}

void arena_user(ellm_pool* pool, unsigned seed) {
  std::mt19937 rng(seed);
  std::vector<void*> held;
  while (!g_stop.load()) {
    void* p = ellm_pool_malloc(pool, kChunk * (1 + rng() % 3), 0);
    if (p) {
      g_mallocs++;
      held.push_back(p);
    }
    if (!p || held.size() > 6) {  // out of memory (after reclaiming) or enough: let go
      for (void* q : held) ellm_pool_free(pool, q, 0);
      held.clear();
      ellm_pool_empty_cache(pool);
    }
  }
  for (void* q : held) ellm_pool_free(pool, q, 0);
}

// A tag's bytes at three spots of a page (start, middle, end).
constexpr size_t kSpot = 64;
constexpr size_t kSpots[] = {0, kChunk / 2, kChunk - kSpot};

void write_tag(uintptr_t page, uint32_t tag) {
  for (size_t off : kSpots)
    for (size_t i = 0; i < kSpot; ++i)
      reinterpret_cast<volatile uint8_t*>(page + off)[i] = static_cast<uint8_t>(tag * 131 + i * 7 + off);
}

bool tag_intact(uintptr_t page, uint32_t tag) {
  for (size_t off : kSpots)
    for (size_t i = 0; i < kSpot; ++i)
      if (reinterpret_cast<volatile uint8_t*>(page + off)[i] != static_cast<uint8_t>(tag * 131 + i * 7 + off))
        return false;
  return true;
}

// Swaps pages [first, first + n) of `shared` (or of spaces of its own, when
// shared is null) out and in; see the top of the file.
void kv_swapper(ellm_pool* pool, ellm_kv_space* shared, uint32_t first, uint32_t n, unsigned seed) {
  std::mt19937 rng(seed);
  while (!g_stop.load()) {
    ellm_kv_space* s = shared ? shared : ellm_kv_create(pool, "swap", first + n);
    if (!s) continue;
    uintptr_t base = ellm_kv_base(s);
    std::vector<uint32_t> tag(n, 0);  // 0: the page holds nothing of ours
    for (uint32_t i = 0; i < n; ++i) {
      int r = 1;
      for (int tries = 0; tries < 200 && r != 0 && !g_stop.load(); ++tries)  // the arena lets go now and then
        if ((r = ellm_kv_map(s, first + i, 1)) != 0) std::this_thread::yield();
      if (r == 0) write_tag(base + (first + i) * kChunk, tag[i] = ++g_tag);
    }
    for (int round = 0; round < 6 && !g_stop.load(); ++round) {
      std::vector<uint32_t> out;
      for (uint32_t i = 0; i < n; ++i)
        if (tag[i] && rng() % 3) out.push_back(first + i);
      if (out.empty()) continue;
      if (ellm_kv_swap_out(s, out.data(), static_cast<uint32_t>(out.size()), 0) != 0) {  // the host tier is full
        g_swap_refused++;
        continue;
      }
      g_swap_outs++;
      switch (rng() % 4) {
        case 0: ellm_kv_finish_swaps(s, 1); break;
        case 1: ellm_kv_finish_swaps(s, 0); break;
        case 2: std::this_thread::yield(); break;  // the arena's reclaim may finish them
        default: {  // the request is gone: its bytes are dropped wherever they are
          uint32_t p = out.back();
          out.pop_back();
          if (ellm_kv_unmap(s, p, 0) == 1) g_swap_drops++;
          tag[p - first] = 0;
        }
      }
      if (out.empty()) continue;
      int r;
      while ((r = ellm_kv_swap_in(s, out.data(), static_cast<uint32_t>(out.size()), 0)) != 0 && !g_stop.load())
        g_swap_in_retries++, std::this_thread::yield();  // the pool is short: the arena lets go now and then
      if (r != 0) break;  // stopping with pages swapped out: unmap or destroy drops them
      g_swap_ins++;
      ellm_kv_swap_wait(s, out.data(), static_cast<uint32_t>(out.size()), 0);
      for (uint32_t p : out) {
        g_swap_checked++;
        if (!tag_intact(base + p * kChunk, tag[p - first]) && g_swap_errors++ < 5)
          fprintf(stderr, "kv_stress: page %u (tag %u) differs after a swap round trip\n", p, tag[p - first]);
      }
      ellm_kv_finish_swaps(s, rng() % 2);
      uint32_t i = rng() % n;  // a kernel writes a page again
      if (tag[i] && ellm_kv_state(s, first + i) == 1) write_tag(base + (first + i) * kChunk, tag[i] = ++g_tag);
    }
    if (!shared) {
      std::vector<uint32_t> out;
      for (uint32_t i = 0; i < n; ++i)
        if (ellm_kv_state(s, first + i) == 1 && rng() % 2) out.push_back(first + i);
      if (!out.empty() && ellm_kv_swap_out(s, out.data(), static_cast<uint32_t>(out.size()), 0) == 0) g_swap_outs++;
      ellm_kv_destroy(s);  // pages swapped out, or with their copies in flight, go with it
      continue;
    }
    for (uint32_t i = 0; i < n; ++i)  // pinned, swapped or swapping: unmap gives back both tiers' chunks
      if (ellm_kv_state(s, first + i) > 0) ellm_kv_unmap(s, first + i, 0);
  }
}

bool host_tier_empty(ellm_pool* pool) {
  ellm_host_tier_stats h;
  ellm_pool_host_stats(pool, &h);
  uint64_t held = 0;
  for (uint64_t o = 0; o < h.num_owners; ++o) {
    ellm_owner_stats s;
    if (ellm_pool_host_owner_stats(pool, static_cast<int>(o), &s) == 0) held += s.held_chunks;
  }
  return held == 0 && h.free_chunks == h.created_chunks;
}

}  // namespace

int main(int argc, char** argv) {
  double seconds = argc > 1 ? atof(argv[1]) : 5.0;
  ellm_pool* pool = ellm_pool_create("host", 0, 40 * kChunk, 0.0, 0, 0, 0);  // 24 + the swappers' 16
  if (!pool) {
    fprintf(stderr, "pool: %s\n", ellm_last_error());
    return 2;
  }
  if (ellm_pool_set_cpu_budget(pool, 12 * kChunk) != 0) {
    fprintf(stderr, "cpu budget: %s\n", ellm_last_error());
    return 2;
  }
  ellm_kv_space* shared = ellm_kv_create(pool, "swap.shared", 8);
  std::vector<std::thread> threads;
  for (unsigned i = 0; i < 8; ++i)
    threads.emplace_back(i % 2 ? arena_user : kv_owner, pool, 1234 + i);
  threads.emplace_back(kv_swapper, pool, shared, 0, 4, 99);
  threads.emplace_back(kv_swapper, pool, shared, 4, 4, 98);
  threads.emplace_back(kv_swapper, pool, nullptr, 0, 3, 97);
  threads.emplace_back(kv_swapper, pool, nullptr, 2, 4, 96);
  std::this_thread::sleep_for(std::chrono::duration<double>(seconds));
  g_stop = true;
  for (auto& t : threads) t.join();
  char why[512];
  int valid = ellm_pool_validate(pool, why, sizeof why);  // both tiers' ledgers, the shared space still there
  ellm_kv_destroy(shared);
  if (valid == 0) valid = ellm_pool_validate(pool, why, sizeof why);
  bool host_empty = host_tier_empty(pool);
  uint64_t zero_users = 1, zero_pages = 1;
  ellm_pool_zero_chunk(pool, nullptr, &zero_users, &zero_pages);
  int64_t leaked = ellm_pool_destroy(pool);
  printf("kv_stress: %ld spaces (%ld zero-filled), %ld map runs, %ld pages seen reclaimed, %ld arena mallocs; "
         "swap: %ld out (%ld refused), %ld in (%ld retries), %ld pages dropped while out, %ld pages checked, "
         "%ld differ; validate %s; leaked %lld; zero chunk users %llu, pages %llu; host tier %s\n",
         g_spaces.load(), g_zero_filled.load(), g_maps.load(), g_reclaimed.load(), g_mallocs.load(),
         g_swap_outs.load(), g_swap_refused.load(), g_swap_ins.load(), g_swap_in_retries.load(), g_swap_drops.load(),
         g_swap_checked.load(), g_swap_errors.load(), valid == 0 ? "ok" : why, static_cast<long long>(leaked),
         static_cast<unsigned long long>(zero_users), static_cast<unsigned long long>(zero_pages),
         host_empty ? "empty" : "NOT EMPTY");
  return valid == 0 && leaked == 0 && g_reclaimed.load() > 0 && g_zero_filled.load() > 0 && zero_users == 0 &&
                 zero_pages == 0 && host_empty && g_swap_ins.load() > 0 && g_swap_checked.load() > 0 &&
                 g_swap_errors.load() == 0
             ? 0
             : 1;
}

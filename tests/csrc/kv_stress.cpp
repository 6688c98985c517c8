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

}  // namespace

int main(int argc, char** argv) {
  double seconds = argc > 1 ? atof(argv[1]) : 5.0;
  ellm_pool* pool = ellm_pool_create("host", 0, 24 * kChunk, 0.0, 0, 0, 0);
  if (!pool) {
    fprintf(stderr, "pool: %s\n", ellm_last_error());
    return 2;
  }
  std::vector<std::thread> threads;
  for (unsigned i = 0; i < 8; ++i)
    threads.emplace_back(i % 2 ? arena_user : kv_owner, pool, 1234 + i);
  std::this_thread::sleep_for(std::chrono::duration<double>(seconds));
  g_stop = true;
  for (auto& t : threads) t.join();
  char why[512];
  int valid = ellm_pool_validate(pool, why, sizeof why);
  uint64_t zero_users = 1, zero_pages = 1;
  ellm_pool_zero_chunk(pool, nullptr, &zero_users, &zero_pages);
  int64_t leaked = ellm_pool_destroy(pool);
  printf("kv_stress: %ld spaces (%ld zero-filled), %ld map runs, %ld pages seen reclaimed, %ld arena mallocs; "
         "validate %s; leaked %lld; zero chunk users %llu, pages %llu\n",
         g_spaces.load(), g_zero_filled.load(), g_maps.load(), g_reclaimed.load(), g_mallocs.load(),
         valid == 0 ? "ok" : why, static_cast<long long>(leaked), static_cast<unsigned long long>(zero_users),
         static_cast<unsigned long long>(zero_pages));
  return valid == 0 && leaked == 0 && g_reclaimed.load() > 0 && g_zero_filled.load() > 0 && zero_users == 0 &&
                 zero_pages == 0
             ? 0
             : 1;
}

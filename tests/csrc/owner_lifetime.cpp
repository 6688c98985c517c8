// owner_lifetime.cpp: the owner-lifetime rule of csrc/pool.h, through the C ABI.
//
//  1. A reclaim callback that throws (it must not, but a C++ owner might)
//     still has its in-flight count dropped: the exception reaches the C ABI
//     as a status, and unregistering that owner afterwards returns instead
//     of waiting forever.
//  2. An owner unregistering from inside its own callback is refused (it
//     would wait for itself), and may leave once the callback has returned.
//
// Built with -fsanitize=address,undefined and run by `make test-sanitize`.
// Exits 0 when every check holds; a step that could wait forever is timed
// out and fails.
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <thread>
#include <stdexcept>

#include "../../csrc/c_api.h"

namespace {

int g_failures = 0;

void check(bool ok, const char* what) {
  std::printf("%s %s\n", ok ? "ok  " : "FAIL", what);
  if (!ok) ++g_failures;
}

size_t throwing_reclaim(void*, size_t) { throw std::runtime_error("reclaim callback threw"); }

struct SelfLeaver {
  ellm_pool* pool;
  int owner;
  int status = -1;
  char message[256] = "";
};
size_t leave_inside_own_callback(void* ctx, size_t) {
  auto* s = static_cast<SelfLeaver*>(ctx);
  s->status = ellm_pool_unregister_owner(s->pool, s->owner);
  std::snprintf(s->message, sizeof s->message, "%s", ellm_last_error());
  return 0;
}

// Runs f on another thread and waits up to 5 s. A call that has not returned
// by then is stuck for good (a wait that cannot end): report and exit at once,
// since the stuck thread cannot be joined.
template <class F>
bool returns_in_time(F f, const char* what) {
  std::atomic<bool> done{false};
  std::thread([&done, f] {
    f();
    done = true;
  }).detach();
  for (int i = 0; i < 500 && !done; ++i) std::this_thread::sleep_for(std::chrono::milliseconds(10));
  if (!done) {
    std::printf("FAIL %s: still waiting after 5 s\n", what);
    std::fflush(stdout);
    std::_Exit(1);
  }
  return true;
}

}  // namespace

int main() {
  ellm_pool* pool = ellm_pool_create("host", 0, 8u << 21, 0.0, 0, 0, 0);  // 8 chunks of 2 MiB
  if (!pool) {
    std::fprintf(stderr, "pool: %s\n", ellm_last_error());
    return 2;
  }
  uint32_t ids[16];
  int hungry = ellm_pool_register_owner(pool, "hungry", nullptr, nullptr);

  int thrower = ellm_pool_register_owner(pool, "thrower", &throwing_reclaim, nullptr);
  int r = ellm_pool_acquire(pool, hungry, 9, ids);  // more than the budget: every other owner is asked
  check(r != 0 && std::strstr(ellm_last_error(), "reclaim callback threw"),
        "a throwing callback reaches the C ABI as a status and a message");
  const char* what = "the throwing owner unregisters afterwards (its in-flight count was dropped)";
  check(returns_in_time([&] { r = ellm_pool_unregister_owner(pool, thrower); }, what) && r == 0, what);

  SelfLeaver leaver{pool, -1};
  leaver.owner = ellm_pool_register_owner(pool, "leaver", &leave_inside_own_callback, &leaver);
  what = "an owner unregistering inside its own callback does not wait for itself";
  check(returns_in_time([&] { ellm_pool_acquire(pool, hungry, 9, ids); }, what), what);
  check(leaver.status != 0 && std::strstr(leaver.message, "inside its own reclaim callback"),
        "... and is refused with a message");
  check(ellm_pool_unregister_owner(pool, leaver.owner) == 0, "... and leaves once outside the callback");

  check(ellm_pool_acquire(pool, hungry, 8, ids) == 0 && ellm_pool_release(pool, hungry, 8, ids) == 0,
        "the pool still serves the whole budget");
  char why[256];
  check(ellm_pool_validate(pool, why, sizeof why) == 0, "the ledger balances");
  check(ellm_pool_destroy(pool) == 0, "no leaked blocks");
  return g_failures == 0 ? 0 : 1;
}

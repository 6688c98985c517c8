// ptrmap.h: pointer -> tagged value, open addressing with linear probing.
//
// The arena looks up every free() here, so it must not allocate per insert
// (std::unordered_map does) and must stay a few cache lines per lookup.
// Keys are 512-aligned addresses, never 0 (0 marks an empty slot). Deletion
// shifts the following run back, so there are no tombstones.
#pragma once

#include <cstdint>
#include <vector>

namespace ellm {

class PtrMap {
 public:
  PtrMap() { slots_.resize(1024); }

  size_t size() const { return count_; }

  void insert(uintptr_t key, uintptr_t value) {
    if ((count_ + 1) * 2 > slots_.size()) rehash(slots_.size() * 2);
    size_t i = index(key);
    while (slots_[i].key != 0) i = (i + 1) & mask();
    slots_[i] = {key, value};
    ++count_;
  }

  // Returns 0 when absent.
  uintptr_t find(uintptr_t key) const {
    for (size_t i = index(key);; i = (i + 1) & mask()) {
      if (slots_[i].key == key) return slots_[i].value;
      if (slots_[i].key == 0) return 0;
    }
  }

  // Removes key and returns its value, or 0 when absent.
  uintptr_t erase(uintptr_t key) {
    size_t i = index(key);
    for (;; i = (i + 1) & mask()) {
      if (slots_[i].key == 0) return 0;
      if (slots_[i].key == key) break;
    }
    uintptr_t value = slots_[i].value;
    // Backward-shift: move later members of the probe run into the hole when
    // their home slot is at or before it (cyclically).
    size_t hole = i;
    for (size_t j = (i + 1) & mask(); slots_[j].key != 0; j = (j + 1) & mask()) {
      size_t home = index(slots_[j].key);
      if (((j - home) & mask()) >= ((j - hole) & mask())) {
        slots_[hole] = slots_[j];
        hole = j;
      }
    }
    slots_[hole] = {0, 0};
    --count_;
    return value;
  }

  template <class F>
  void for_each(F&& f) const {
    for (const Slot& s : slots_)
      if (s.key) f(s.key, s.value);
  }

 private:
  struct Slot {
    uintptr_t key, value;
  };
  size_t mask() const { return slots_.size() - 1; }
  size_t index(uintptr_t key) const {
    return static_cast<size_t>(((key >> 9) * 0x9E3779B97F4A7C15ull) >> shift_);
  }
  void rehash(size_t n) {
    std::vector<Slot> old;
    old.swap(slots_);
    slots_.assign(n, {0, 0});
    shift_ = 64 - __builtin_ctzll(n);
    count_ = 0;
    for (const Slot& s : old)
      if (s.key) insert(s.key, s.value);
  }

  std::vector<Slot> slots_;
  size_t count_ = 0;
  unsigned shift_ = 64 - 10;
};

}  // namespace ellm

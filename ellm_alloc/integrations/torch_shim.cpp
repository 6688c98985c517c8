// torch_shim.cpp: the one piece built against torch's own headers.
//
// torch turns a c10::OutOfMemoryError thrown by an allocator into
// torch.OutOfMemoryError in Python; any other exception becomes a plain
// RuntimeError. The core library cannot link torch, so enable() compiles this
// file against the torch already installed (cached per torch version) and
// hands ellm_torch_throw_oom to ellm_set_oom_thrower().
#include <c10/util/Exception.h>

extern "C" __attribute__((visibility("default"))) void ellm_torch_throw_oom(const char* msg) {
  TORCH_CHECK_WITH(OutOfMemoryError, false, msg);
}

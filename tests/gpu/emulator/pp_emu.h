// A host-side emulator for pinpoint's CUDA kernels (a test tool, never part of the build).
//
// csrc/cuda/common.cuh includes this header instead of the CUDA headers when
// PINPOINT_CUDA_EMULATE is defined, so csrc/cuda/*.cu compile as plain C++ and run on the
// CPU: each CUDA thread of a block is a host thread, blocks run one after another, and
// __syncthreads / warp collectives are barriers. ldmatrix, mma.sync m16n8k16 and cp.async
// are implemented from the fragment layouts of the PTX ISA, so running the kernels here
// checks their index math, masking and zero-fill against the reference. It cannot check
// the PTX itself, timing, or the memory model beyond what barriers order (run it under
// ThreadSanitizer for shared-memory races, AddressSanitizer for out-of-bounds accesses).
//
// Threads are ucontext fibers on one host thread by default (fast, deterministic order);
// PP_EMU_THREADS=os runs them as real host threads instead (use this under the sanitizers).
// Shared memory starts as 0xFF bytes (NaN in every float format) so a tile that is read
// without being written poisons the result. PP_EMU_CPASYNC=lazy defers every cp.async to
// the wait that covers it (the latest legal moment), =eager (default) copies at issue.
#pragma once

#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <ucontext.h>
#include <vector>

#include "cpu/dtypes.h"

#define PP_DEVICE inline
#define PP_GLOBAL
#define PP_LAUNCH_BOUNDS(n)
#define PP_RESTRICT
#define PP_UNROLL
#define PP_DYNAMIC_SMEM(name) uint8_t* name = ::pinpoint::cuda::emu::smem_base()

struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct pp_emu_uint3 { unsigned x, y, z; };
inline thread_local pp_emu_uint3 threadIdx{0, 0, 0};
inline thread_local pp_emu_uint3 blockIdx{0, 0, 0};
inline thread_local dim3 blockDim;
inline thread_local dim3 gridDim;

struct float2 { float x, y; };
inline float2 make_float2(float x, float y) { return {x, y}; }

namespace pinpoint {
namespace cuda {
namespace emu {

[[noreturn]] inline void die(const char* what) {
  std::fprintf(stderr, "pp_emu: %s (block %u,%u,%u thread %u)\n", what, blockIdx.x, blockIdx.y,
               blockIdx.z, threadIdx.x);
  std::fflush(stderr);
  std::abort();
}

inline bool os_threads() {
  static const bool os = [] {
    const char* v = std::getenv("PP_EMU_THREADS");
    return v && std::strcmp(v, "os") == 0;
  }();
  return os;
}

struct Fiber;
inline void fiber_block(std::vector<Fiber*>& waiters);
inline void fiber_release(std::vector<Fiber*>& waiters);

class Barrier {
 public:
  explicit Barrier(int n) : n_(n) {}
  void wait() {
    if (!os_threads()) {
      if (++count_ == n_) {
        count_ = 0;
        fiber_release(waiters_);
      } else {
        fiber_block(waiters_);
      }
      return;
    }
    std::unique_lock<std::mutex> lk(mu_);
    const uint64_t gen = gen_;
    if (++count_ == n_) {
      count_ = 0;
      ++gen_;
      cv_.notify_all();
      return;
    }
    if (!cv_.wait_for(lk, std::chrono::seconds(120), [&] { return gen_ != gen; }))
      die("barrier timed out: a __syncthreads or warp collective is not reached by every thread");
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  int n_, count_ = 0;
  uint64_t gen_ = 0;
  std::vector<Fiber*> waiters_;
};

struct Warp {
  Barrier bar{32};
  uint32_t xch[32][10];
  const void* addr[32];
};

struct Block {
  explicit Block(int threads, size_t smem_bytes) : bar(threads), smem(smem_bytes ? smem_bytes : 1, 0xFF) {
    for (int w = 0; w < threads / 32; ++w) warps.emplace_back(new Warp);
  }
  Barrier bar;
  std::vector<std::unique_ptr<Warp>> warps;
  std::vector<uint8_t> smem;
};

struct Copy { void* dst; const void* src; bool valid; bool done; };
struct ThreadState {
  Block* block = nullptr;
  int tid = 0;
  std::vector<Copy> open;                 // issued, not yet committed
  std::vector<std::vector<Copy>> groups;  // committed, oldest first
};
inline thread_local ThreadState* tls_ptr = nullptr;
inline ThreadState& ts() { return *tls_ptr; }

inline bool lazy_cp_async() {
  static const bool lazy = [] {
    const char* v = std::getenv("PP_EMU_CPASYNC");
    return v && std::strcmp(v, "lazy") == 0;
  }();
  return lazy;
}

inline uint8_t* smem_base() { return ts().block->smem.data(); }
inline Warp& warp() { return *ts().block->warps[size_t(ts().tid >> 5)]; }
inline int lane() { return ts().tid & 31; }

inline void check_smem(const void* p, size_t bytes, size_t align, const char* op) {
  const uint8_t* b = ts().block->smem.data();
  const uint8_t* q = static_cast<const uint8_t*>(p);
  if (q < b || q + bytes > b + ts().block->smem.size()) {
    std::fprintf(stderr, "pp_emu: %s: shared address out of range (offset %ld of %zu)\n", op,
                 long(q - b), ts().block->smem.size());
    die("shared memory out of range");
  }
  if ((q - b) % long(align)) die("misaligned shared address");
}

inline float bits_f(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
inline uint32_t f_bits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }

inline float bf16_to_float(uint16_t x) { return ::pinpoint::bf16_to_float(x); }
inline float fp16_to_float(uint16_t x) { return ::pinpoint::fp16_to_float(x); }
inline uint16_t float_to_bf16(float x) { return ::pinpoint::float_to_bf16(x); }
inline uint16_t float_to_fp16(float x) { return ::pinpoint::float_to_fp16(x); }
inline float exp2_approx(float x) { return std::exp2(x); }
inline float fadd_rn(float a, float b) { volatile float s = a + b; return s; }
inline float fmul_rn(float a, float b) { volatile float s = a * b; return s; }

inline float shfl_xor(float v, int mask) {
  Warp& w = warp();
  const int l = lane();
  w.xch[l][0] = f_bits(v);
  w.bar.wait();
  const float r = bits_f(w.xch[l ^ mask][0]);
  w.bar.wait();
  return r;
}
inline float shfl_idx(float v, int src) {
  Warp& w = warp();
  const int l = lane();
  w.xch[l][0] = f_bits(v);
  w.bar.wait();
  const float r = bits_f(w.xch[src & 31][0]);
  w.bar.wait();
  return r;
}

// ldmatrix.m8n8.x4(.trans).b16: lanes 8j..8j+7 address the 8 rows of matrix j.
inline void ldmatrix_x4(uint32_t (&r)[4], const void* p, bool trans) {
  check_smem(p, 16, 16, "ldmatrix");
  Warp& w = warp();
  const int l = lane();
  w.addr[l] = p;
  w.bar.wait();
  for (int j = 0; j < 4; ++j) {
    uint16_t lo, hi;
    if (!trans) {
      const uint16_t* row = static_cast<const uint16_t*>(w.addr[j * 8 + l / 4]);
      lo = row[2 * (l % 4)];
      hi = row[2 * (l % 4) + 1];
    } else {
      lo = static_cast<const uint16_t*>(w.addr[j * 8 + 2 * (l % 4)])[l / 4];
      hi = static_cast<const uint16_t*>(w.addr[j * 8 + 2 * (l % 4) + 1])[l / 4];
    }
    r[j] = uint32_t(lo) | (uint32_t(hi) << 16);
  }
  w.bar.wait();
}

// mma.sync.m16n8k16.row.col.f32.{bf16,f16}: fragments per the PTX ISA (groupID = lane/4,
// threadID_in_group = lane%4): A regs (g,2t), (g+8,2t), (g,2t+8), (g+8,2t+8); B regs rows
// (2t, 2t+8) of column g; C/D (g, 2t..2t+1), (g+8, 2t..2t+1). Low half = lower index.
inline void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1, bool bf16) {
  Warp& w = warp();
  const int l = lane();
  for (int i = 0; i < 4; ++i) w.xch[l][i] = a[i];
  w.xch[l][4] = b0;
  w.xch[l][5] = b1;
  w.bar.wait();
  auto cv = [bf16](uint32_t bits) { return bf16 ? bf16_to_float(uint16_t(bits)) : fp16_to_float(uint16_t(bits)); };
  float A[16][16], B[16][8];
  for (int L = 0; L < 32; ++L) {
    const int g = L / 4, t = L % 4;
    const uint32_t* x = w.xch[L];
    A[g][2 * t] = cv(x[0]); A[g][2 * t + 1] = cv(x[0] >> 16);
    A[g + 8][2 * t] = cv(x[1]); A[g + 8][2 * t + 1] = cv(x[1] >> 16);
    A[g][2 * t + 8] = cv(x[2]); A[g][2 * t + 9] = cv(x[2] >> 16);
    A[g + 8][2 * t + 8] = cv(x[3]); A[g + 8][2 * t + 9] = cv(x[3] >> 16);
    B[2 * t][g] = cv(x[4]); B[2 * t + 1][g] = cv(x[4] >> 16);
    B[2 * t + 8][g] = cv(x[5]); B[2 * t + 9][g] = cv(x[5] >> 16);
  }
  w.bar.wait();
  const int g = l / 4, t = l % 4;
  const int rows[4] = {g, g, g + 8, g + 8}, cols[4] = {2 * t, 2 * t + 1, 2 * t, 2 * t + 1};
  for (int e = 0; e < 4; ++e) {
    float acc = 0.f;
    for (int k = 0; k < 16; ++k) acc += A[rows[e]][k] * B[k][cols[e]];
    d[e] += acc;
  }
}

inline void do_copy(const Copy& c) {
  if (c.valid) std::memcpy(c.dst, c.src, 16);
  else std::memset(c.dst, 0, 16);
}
inline void cp_async_16(void* dst, const void* src, bool valid) {
  check_smem(dst, 16, 16, "cp.async");
  if (valid && (reinterpret_cast<uintptr_t>(src) & 15u)) die("cp.async from a misaligned global address");
  const bool eager = !lazy_cp_async();
  if (eager) do_copy({dst, src, valid, false});
  ts().open.push_back({dst, src, valid, eager});
}
inline void cp_async_commit() {
  ts().groups.push_back(std::move(ts().open));
  ts().open.clear();
}
inline void cp_async_wait(int n) {
  if (!ts().open.empty()) die("cp.async.wait_group with uncommitted copies");
  while (int(ts().groups.size()) > n) {
    for (const Copy& c : ts().groups.front())
      if (!c.done) do_copy(c);
    ts().groups.erase(ts().groups.begin());
  }
}

struct Fiber {
  ucontext_t ctx;
  std::vector<char> stack;
  ThreadState state;
  pp_emu_uint3 tidx{0, 0, 0};
  bool runnable = true, done = false;
};

struct Scheduler {
  ucontext_t main;
  std::vector<std::unique_ptr<Fiber>> fibers;
  Fiber* current = nullptr;
  std::function<void()> body;
};
inline thread_local Scheduler* sched = nullptr;

inline void fiber_block(std::vector<Fiber*>& waiters) {
  Fiber* f = sched->current;
  f->runnable = false;
  waiters.push_back(f);
  swapcontext(&f->ctx, &sched->main);
}
inline void fiber_release(std::vector<Fiber*>& waiters) {
  for (Fiber* f : waiters) f->runnable = true;
  waiters.clear();
}

inline void check_exit() {
  for (const auto& grp : ts().groups)
    if (!grp.empty()) die("kernel exited with uncompleted cp.async groups");
}

inline void fiber_entry() {
  sched->body();
  check_exit();
  Fiber* f = sched->current;
  f->done = true;
  swapcontext(&f->ctx, &sched->main);
}

template <typename F>
void launch(dim3 grid, dim3 block, size_t smem_bytes, F&& body) {
  if (block.x % 32 || block.y != 1 || block.z != 1) die("emulator: blocks must be 1-D, whole warps");
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        Block blk(int(block.x), smem_bytes);
        if (os_threads()) {
          std::vector<std::thread> threads;
          threads.reserve(block.x);
          for (unsigned tid = 0; tid < block.x; ++tid)
            threads.emplace_back([&, tid] {
              ThreadState st;
              tls_ptr = &st;
              ts().block = &blk;
              ts().tid = int(tid);
              threadIdx = {tid, 0, 0};
              blockIdx = {x, y, z};
              blockDim = block;
              gridDim = grid;
              body();
              check_exit();
            });
          for (auto& t : threads) t.join();
          continue;
        }
        Scheduler sc;
        sc.body = [&] { body(); };
        Scheduler* saved = sched;
        sched = &sc;
        blockIdx = {x, y, z};
        blockDim = block;
        gridDim = grid;
        for (unsigned tid = 0; tid < block.x; ++tid) {
          auto f = std::make_unique<Fiber>();
          f->stack.resize(256 * 1024);
          f->state.block = &blk;
          f->state.tid = int(tid);
          f->tidx = {tid, 0, 0};
          getcontext(&f->ctx);
          f->ctx.uc_stack.ss_sp = f->stack.data();
          f->ctx.uc_stack.ss_size = f->stack.size();
          f->ctx.uc_link = nullptr;
          makecontext(&f->ctx, fiber_entry, 0);
          sc.fibers.push_back(std::move(f));
        }
        for (;;) {
          bool any_left = false, progressed = false;
          for (auto& f : sc.fibers) {
            if (f->done) continue;
            any_left = true;
            if (!f->runnable) continue;
            sc.current = f.get();
            tls_ptr = &f->state;
            threadIdx = f->tidx;
            swapcontext(&sc.main, &f->ctx);
            progressed = true;
          }
          if (!any_left) break;
          if (!progressed) die("deadlock: every live thread waits at a barrier that cannot complete");
        }
        sched = saved;
      }
}

}  // namespace emu
}  // namespace cuda
}  // namespace pinpoint

inline void __syncthreads() { ::pinpoint::cuda::emu::ts().block->bar.wait(); }

// Device building blocks of the CUDA kernels (distill_cuda.cu): 16-byte group
// loads/stores in any of the three logits dtypes, the alpha-beta form dispatch,
// block reductions, and the per-thread online-softmax updates.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "distill_math.h"

namespace distillkit::cuda {

constexpr int kVec = 8;             // elements per thread per step
constexpr int kMaxThreads = 512;    // forward blocks (<= 128 registers per thread)
constexpr int kBwdThreads = 256;
constexpr int kBwdGroupsPerThread = 4;

// 2^x by ex2.approx.ftz (distill_math.h, fexp): the loops fold log2(e) / T into one multiplier.
constexpr float kLog2e = ExpConsts::log2e;
__device__ __forceinline__ float fexp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// -- element access ---------------------------------------------------------------
__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v) {
  if constexpr (std::is_same_v<T, float>) return v;
  else if constexpr (std::is_same_v<T, __nv_bfloat16>) return __float2bfloat16_rn(v);
  else return __float2half_rn(v);
}

// 8 elements from a 16-byte aligned address (two float4 for fp32); kGlobal: through
// the read-only data cache, else a plain (shared-memory) load.
template <typename T, bool kGlobal = true>
__device__ __forceinline__ void load_vec8(const T* __restrict__ p, float (&v)[kVec]) {
  if constexpr (std::is_same_v<T, float>) {
    const float4* q = reinterpret_cast<const float4*>(p);
    const float4 x = kGlobal ? __ldg(q) : q[0];
    const float4 y = kGlobal ? __ldg(q + 1) : q[1];
    v[0] = x.x; v[1] = x.y; v[2] = x.z; v[3] = x.w;
    v[4] = y.x; v[5] = y.y; v[6] = y.z; v[7] = y.w;
  } else {
    const uint4* q = reinterpret_cast<const uint4*>(p);
    const uint4 raw = kGlobal ? __ldg(q) : q[0];
    const uint32_t words[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      float2 f;
      if constexpr (std::is_same_v<T, __nv_bfloat16>) {  // bf16 is fp32's high half: one shift or mask each
        f = make_float2(__uint_as_float(words[i] << 16), __uint_as_float(words[i] & 0xffff0000u));
      } else {
        __half2 h;
        memcpy(&h, &words[i], 4);
        f = __half22float2(h);
      }
      v[2 * i] = f.x;
      v[2 * i + 1] = f.y;
    }
  }
}

// One 16-byte store to a 16-byte aligned address; kGlobal: st.global.v4 spelled out (NVVM split the
// plain uint4 / float4 stores of the backward's loop into four 4-byte ones), else a plain store.
template <bool kGlobal>
__device__ __forceinline__ void store16(void* p, uint4 w) {
  if constexpr (kGlobal) {
    asm volatile("st.global.v4.b32 [%0], {%1, %2, %3, %4};" ::"l"(p), "r"(w.x), "r"(w.y), "r"(w.z), "r"(w.w)
                 : "memory");
  } else {
    *reinterpret_cast<uint4*>(p) = w;
  }
}

template <typename T, bool kGlobal = true>
__device__ __forceinline__ void store_vec8(T* __restrict__ p, const float (&v)[kVec]) {
  if constexpr (std::is_same_v<T, float>) {
    store16<kGlobal>(p, make_uint4(__float_as_uint(v[0]), __float_as_uint(v[1]), __float_as_uint(v[2]),
                                   __float_as_uint(v[3])));
    store16<kGlobal>(p + 4, make_uint4(__float_as_uint(v[4]), __float_as_uint(v[5]), __float_as_uint(v[6]),
                                       __float_as_uint(v[7])));
  } else {
    auto pack = [&](int i) {  // two elements in one word, as __floats2*2_rn rounds them
      uint32_t w;
      if constexpr (std::is_same_v<T, __nv_bfloat16>) {
        const __nv_bfloat162 h = __floats2bfloat162_rn(v[2 * i], v[2 * i + 1]);
        memcpy(&w, &h, 4);
      } else {
        const __half2 h = __floats2half2_rn(v[2 * i], v[2 * i + 1]);
        memcpy(&w, &h, 4);
      }
      return w;
    };
    store16<kGlobal>(p, make_uint4(pack(0), pack(1), pack(2), pack(3)));
  }
}

// Group [start, start + 8) of a row of length V: vector load when whole and aligned,
// else masked scalar loads; elements outside the row read as -inf (they add 0).
template <typename T>
__device__ __forceinline__ void load_group(const T* __restrict__ row, int64_t start, int64_t V, bool vec_ok,
                                           float (&v)[kVec]) {
  if (vec_ok && start >= 0 && start + kVec <= V) {
    load_vec8(row + start, v);
  } else {
#pragma unroll
    for (int i = 0; i < kVec; ++i) {
      const int64_t idx = start + i;
      v[i] = (idx >= 0 && idx < V) ? to_float(row[idx]) : kNegInf;
    }
  }
}

template <typename T>
__device__ __forceinline__ void store_group(T* __restrict__ row, int64_t start, int64_t V, bool vec_ok,
                                            const float (&v)[kVec]) {
  if (vec_ok && start >= 0 && start + kVec <= V) {
    store_vec8(row + start, v);
  } else {
#pragma unroll
    for (int i = 0; i < kVec; ++i) {
      const int64_t idx = start + i;
      if (idx >= 0 && idx < V) row[idx] = from_float<T>(v[i]);
    }
  }
}

// Elements from the row start to the student's next 16-byte boundary.
template <typename T>
__device__ __forceinline__ int shift_of(const T* row) {
  return static_cast<int>((reinterpret_cast<uintptr_t>(row) & 15u) / sizeof(T));
}

// Whether `row` is 16-byte aligned at element -shift (so its groups are too).
template <typename T>
__device__ __forceinline__ bool group_aligned(const T* row, int shift) {
  return ((reinterpret_cast<uintptr_t>(row) - static_cast<uintptr_t>(shift) * sizeof(T)) & 15u) == 0;
}

// f(std::integral_constant<int, FORM>) with the call's alpha-beta form (0 for the other divergences):
// the kernel's loop goes inside f, so the form's branch is taken once per block, not per element.
template <int DIV, typename F>
__device__ __forceinline__ void by_form(const DivParams<DIV>& dp, F&& f) {
  if constexpr (DIV == kAlphaBeta) {
    if (dp.form == kAbBoth) return f(std::integral_constant<int, kAbBoth>{});
    if (dp.form == kAbAlphaOnly) return f(std::integral_constant<int, kAbAlphaOnly>{});
    return f(std::integral_constant<int, kAbBetaOnly>{});
  } else {
    return f(std::integral_constant<int, 0>{});
  }
}

// -- block reductions ------------------------------------------------------------------
struct SumOp {
  __device__ __forceinline__ float operator()(float a, float b) const { return a + b; }
};
struct MaxOp {
  __device__ __forceinline__ float operator()(float a, float b) const { return fmaxf(a, b); }
};

// Reduces N values over the block; every thread gets the results. smem: N * 32 floats.
template <int N, typename Op>
__device__ __forceinline__ void block_allreduce(float (&v)[N], float* smem, Op op) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
#pragma unroll
  for (int i = 0; i < N; ++i) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v[i] = op(v[i], __shfl_xor_sync(0xffffffffu, v[i], off));
    if (lane == 0) smem[i * 32 + warp] = v[i];
  }
  __syncthreads();
#pragma unroll
  for (int i = 0; i < N; ++i) {
    float r = smem[i * 32];
    for (int w = 1; w < warps; ++w) r = op(r, smem[i * 32 + w]);
    v[i] = r;
  }
  __syncthreads();  // smem is reused by the next reduction
}

// -- per-thread online softmax over groups ------------------------------------------------
// Running raw max m and z = sum e^((x - m) / T): the max only moves when a group exceeds it,
// then z is rescaled once. fmaxf drops NaN; the sums carry it (div_bad reads it there).
__device__ __forceinline__ void lse_group(const float (&x)[kVec], float inv_t, float& m, float& z) {
  float gm = x[0];
#pragma unroll
  for (int i = 1; i < kVec; ++i) gm = fmaxf(gm, x[i]);
  if (gm > m) {
    z *= shift_scale(m, gm, inv_t);
    m = gm;
  }
  const float ref = safe_ref(m), k = inv_t * kLog2e;
#pragma unroll
  for (int i = 0; i < kVec; ++i) z += fexp2((x[i] - ref) * k);
}

// One-pass KL state (m, z, w, ref) of x against y (distill_math.h, kl_move), over a group:
// w = sum e^((x - m) / T)((x - m) - (y - ref)) over e > 0, ref = y at x's argmax.
__device__ __forceinline__ void kl_group(const float (&x)[kVec], const float (&y)[kVec], float inv_t, float& m,
                                         float& z, float& w, float& ref) {
  float gm = x[0];
#pragma unroll
  for (int i = 1; i < kVec; ++i) gm = fmaxf(gm, x[i]);
  if (gm > m) {  // the group moves the max: ref becomes y there (unless that is -inf)
    float gr = kNegInf;
#pragma unroll
    for (int i = 0; i < kVec; ++i) gr = x[i] == gm ? fmaxf(gr, y[i]) : gr;
    kl_move(m, z, w, ref, gm, gr > kNegInf ? gr : ref, inv_t);
  }
  const float mr = safe_ref(m), k = inv_t * kLog2e;
#pragma unroll
  for (int i = 0; i < kVec; ++i) {
    const float dx = x[i] - mr;
    const float e = fexp2(dx * k);
    z += e;
    w += e > 0.0f ? e * (dx - (y[i] - ref)) : 0.0f;
  }
}

// CE's running (m_s, z_s) at T = 1 over the student's ids [vd, V) past the divergence's, which the
// forward's pass 1 does not read (it reads [0, vd)); in the group holding vd, the ids below it are -inf
// here. The kernels call it before pass 1: placed after it, it pushed a dozen forward kernels past 40
// registers (ptxas, sm_90).
template <typename TS>
__device__ __forceinline__ void ce_tail(const TS* s, int64_t vd, int64_t V, int shift, float& m_s, float& z_s) {
  const int64_t groups = (V + shift + kVec - 1) / kVec;
  for (int64_t g = (vd + shift) / kVec + threadIdx.x; g < groups; g += blockDim.x) {
    const int64_t start = g * kVec - shift;
    float sv[kVec];
    load_group(s, start, V, true, sv);
    if (start < vd) {
#pragma unroll
      for (int i = 0; i < kVec; ++i) sv[i] = start + i < vd ? kNegInf : sv[i];
    }
    lse_group(sv, 1.0f, m_s, z_s);
  }
}

}  // namespace distillkit::cuda

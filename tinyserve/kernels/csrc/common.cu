// Shared helpers for TinyServe's kernels; the loader prepends this file to every other .cu file.
// Header-free on purpose (NVRTC and nvcc see the same text): 16-bit floats are stored as raw
// unsigned shorts and converted with PTX instructions. Tag types select the element type.
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;
struct bf16_t {};
struct f16_t {};

#define TS_NEG_INF (__int_as_float(0xff800000))
#define TS_POS_INF (__int_as_float(0x7f800000))

template <typename T> struct Elt;
template <> struct Elt<bf16_t> {
  static constexpr bool is_bf16 = true;
  static __device__ __forceinline__ float lo(u32 w) { return __uint_as_float(w << 16); }
  static __device__ __forceinline__ float hi(u32 w) { return __uint_as_float(w & 0xffff0000u); }
  static __device__ __forceinline__ float one(u16 h) { return __uint_as_float(((u32)h) << 16); }
  static __device__ __forceinline__ u16 from(float f) {
    u16 r; asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r) : "f"(f)); return r;
  }
};
template <> struct Elt<f16_t> {
  static constexpr bool is_bf16 = false;
  static __device__ __forceinline__ float one(u16 h) {
    float f; asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h)); return f;
  }
  static __device__ __forceinline__ float lo(u32 w) { return one((u16)(w & 0xffffu)); }
  static __device__ __forceinline__ float hi(u32 w) { return one((u16)(w >> 16)); }
  static __device__ __forceinline__ u16 from(float f) {
    u16 r; asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r) : "f"(f)); return r;
  }
};

// 8 consecutive 16-bit elements (one 16-byte load) to floats.
template <typename T>
__device__ __forceinline__ void unpack8(const uint4 &v, float (&f)[8]) {
  f[0] = Elt<T>::lo(v.x); f[1] = Elt<T>::hi(v.x);
  f[2] = Elt<T>::lo(v.y); f[3] = Elt<T>::hi(v.y);
  f[4] = Elt<T>::lo(v.z); f[5] = Elt<T>::hi(v.z);
  f[6] = Elt<T>::lo(v.w); f[7] = Elt<T>::hi(v.w);
}

__device__ __forceinline__ uint4 ldg16(const void *p) {
  return __ldg(reinterpret_cast<const uint4 *>(p));
}

// Streaming 16-byte load (read once: evict-first in L1/L2).
__device__ __forceinline__ uint4 ld_stream16(const void *p) {
  uint4 r;
  asm volatile("ld.global.cs.v4.u32 {%0,%1,%2,%3}, [%4];"
               : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w) : "l"(p));
  return r;
}

// Tensor-core helpers (sm_80+): D = A * B + C with m16n8k16, fp32 accumulators. A is 4 registers of packed
// 16-bit pairs (rows gid / gid+8, k pairs tig*2 / tig*2+8), B is 2 (k pairs tig*2 / tig*2+8, column gid),
// C/D are 4 floats (rows gid / gid+8, columns tig*2, tig*2+1); gid = lane / 4, tig = lane % 4.
template <typename T> struct Mma;
template <> struct Mma<bf16_t> {
  static __device__ __forceinline__ void run(float (&c)[4], u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
                 "{%8,%9}, {%0,%1,%2,%3};"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  }
  // two floats to a packed pair, `lo` in the low half
  static __device__ __forceinline__ u32 pack(float lo, float hi) {
    u32 r; asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo)); return r;
  }
};
template <> struct Mma<f16_t> {
  static __device__ __forceinline__ void run(float (&c)[4], u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
                 "{%8,%9}, {%0,%1,%2,%3};"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  }
  static __device__ __forceinline__ u32 pack(float lo, float hi) {
    u32 r; asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo)); return r;
  }
};

__device__ __forceinline__ u32 word_of(const uint4 &v, int i) {
  return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

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
  static __device__ __forceinline__ float lo(u32 w) { return __uint_as_float(w << 16); }
  static __device__ __forceinline__ float hi(u32 w) { return __uint_as_float(w & 0xffff0000u); }
  static __device__ __forceinline__ float one(u16 h) { return __uint_as_float(((u32)h) << 16); }
  static __device__ __forceinline__ u16 from(float f) {
    u16 r; asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r) : "f"(f)); return r;
  }
};
template <> struct Elt<f16_t> {
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

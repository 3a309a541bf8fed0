// Split-K paged decode attention (dense, or sparse over a per-KV-head page list) and its reduce.
//
// Grid (num_splits, Hkv, B), 128 threads. A CTA owns one KV head of one sequence and a contiguous range
// of its page list (all pages for dense attention; `sel[b, h, :]` logical pages for sparse attention)
// and serves the G = Hq / Hkv query heads of that KV head, so each K/V byte is read once. A group of
// D/8 lanes owns one token at a time (16-byte loads, coalesced rows); every group keeps an online
// softmax (log2 domain) over its tokens; the groups merge in shared memory at the end. With one split
// the CTA writes the output; otherwise it writes a normalised partial (acc, max, sum) for the reduce.
//
// Invariants: page lists are ascending and the sequence's last (partial) page, if present, is the last
// entry; seq_len >= 1; block_size is a power of two (bs_shift = log2).

template <typename T, int D, int G, int UNROLL>
__global__ void __launch_bounds__(128) paged_decode_attention(
    const u16 *__restrict__ q,        // [B, Hq, D]
    const u16 *__restrict__ kc,       // [NB, bs, Hkv, D]
    const u16 *__restrict__ vc,       // [NB, bs, Hkv, D]
    const int *__restrict__ bt,       // [B, bt_stride]
    const int *__restrict__ seq_lens, // [B]
    const int *__restrict__ sel,      // [B, Hkv, sel_k] logical pages, or null for dense
    const int *__restrict__ nsel,     // [B, Hkv] or null
    int bt_stride, int sel_k, int hkv, int bs_shift, int pages_per_split, float scale_log2,
    float *__restrict__ part_acc,     // [B, Hq, S, D]
    float *__restrict__ part_ml,      // [B, Hq, S, 2]
    u16 *__restrict__ out)            // [B, Hq, D]
{
  constexpr int LANES = D / 8;
  constexpr int GPW = 32 / LANES;
  constexpr int NG = 4 * GPW;
  const int split = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const int S = gridDim.x;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int li = lane % LANES, grp = warp * GPW + lane / LANES;
  const int bs = 1 << bs_shift;
  const int hq = hkv * G;

  extern __shared__ int s_phys[];   // [pages_per_split]
  __shared__ float s_m[NG][G], s_l[NG][G];
  __shared__ float s_acc[NG][G][D];

  const int seq = seq_lens[b];
  const int npages_seq = (seq + bs - 1) >> bs_shift;
  const int nlist = sel ? nsel[b * hkv + h] : npages_seq;
  const int p0 = split * pages_per_split;
  const int np = min(pages_per_split, nlist - p0);
  const size_t head_row = (size_t)b * hq + (size_t)h * G;

  if (np <= 0) {   // empty split (ragged batch): contributes nothing
    if (tid < G) {
      float *ml = part_ml + ((head_row + tid) * S + split) * 2;
      ml[0] = TS_NEG_INF; ml[1] = 0.f;
    }
    return;
  }
  int last_lp = 0;
  for (int j = tid; j < np; j += blockDim.x) {
    int lp = sel ? sel[((size_t)b * hkv + h) * sel_k + p0 + j] : p0 + j;
    s_phys[j] = bt[(size_t)b * bt_stride + lp];
  }
  {
    int lp = sel ? sel[((size_t)b * hkv + h) * sel_k + p0 + np - 1] : p0 + np - 1;
    last_lp = lp;
  }
  // tokens in this split: full pages, the last one possibly partial
  const int last_tokens = min(bs, seq - last_lp * bs);
  const int ntok = (np - 1) * bs + last_tokens;
  __syncthreads();

  float qf[G][8];
#pragma unroll
  for (int g = 0; g < G; ++g) {
    uint4 raw = ldg16(q + (head_row + g) * D + li * 8);
    unpack8<T>(raw, qf[g]);
#pragma unroll
    for (int e = 0; e < 8; ++e) qf[g][e] *= scale_log2;
  }
  float m[G], l[G], acc[G][8];
#pragma unroll
  for (int g = 0; g < G; ++g) {
    m[g] = TS_NEG_INF; l[g] = 0.f;
#pragma unroll
    for (int e = 0; e < 8; ++e) acc[g][e] = 0.f;
  }
  const size_t row_stride = (size_t)hkv * D;   // elements between consecutive tokens of a block

  // Warp-uniform trip count (the shuffles below need every lane of the warp): the warp's first group
  // decides, and lanes of groups past the end run with ok = false.
  const int sub = lane / LANES;
  for (int wbase = warp * GPW; wbase < ntok; wbase += NG * UNROLL) {
    uint4 kraw[UNROLL], vraw[UNROLL];
    bool ok[UNROLL];
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      int t = wbase + sub + u * NG;
      ok[u] = t < ntok;
      if (ok[u]) {
        size_t off = ((size_t)s_phys[t >> bs_shift] * bs + (t & (bs - 1))) * row_stride + (size_t)h * D + li * 8;
        kraw[u] = ld_stream16(kc + off);
        vraw[u] = ld_stream16(vc + off);
      }
    }
    float s[UNROLL][G];
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      float kf[8];
      if (ok[u]) unpack8<T>(kraw[u], kf);
#pragma unroll
      for (int g = 0; g < G; ++g) {
        float d = 0.f;
        if (ok[u]) {
#pragma unroll
          for (int e = 0; e < 8; ++e) d = fmaf(qf[g][e], kf[e], d);
        }
#pragma unroll
        for (int o = LANES / 2; o > 0; o >>= 1) d += __shfl_xor_sync(0xffffffffu, d, o);
        s[u][g] = ok[u] ? d : TS_NEG_INF;
      }
    }
#pragma unroll
    for (int g = 0; g < G; ++g) {
      float mn = m[g];
#pragma unroll
      for (int u = 0; u < UNROLL; ++u) mn = fmaxf(mn, s[u][g]);
      float alpha = (mn == TS_NEG_INF) ? 1.f : exp2f(m[g] - mn);
      m[g] = mn;
      l[g] *= alpha;
#pragma unroll
      for (int e = 0; e < 8; ++e) acc[g][e] *= alpha;
#pragma unroll
      for (int u = 0; u < UNROLL; ++u) {
        float p = ok[u] ? exp2f(s[u][g] - mn) : 0.f;
        s[u][g] = p;
        l[g] += p;
      }
    }
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      if (!ok[u]) continue;
      float vf[8];
      unpack8<T>(vraw[u], vf);
#pragma unroll
      for (int g = 0; g < G; ++g)
#pragma unroll
        for (int e = 0; e < 8; ++e) acc[g][e] = fmaf(s[u][g], vf[e], acc[g][e]);
    }
  }

#pragma unroll
  for (int g = 0; g < G; ++g) {
    if (li == 0) { s_m[grp][g] = m[g]; s_l[grp][g] = l[g]; }
#pragma unroll
    for (int e = 0; e < 8; ++e) s_acc[grp][g][li * 8 + e] = acc[g][e];
  }
  __syncthreads();
  for (int idx = tid; idx < G * D; idx += blockDim.x) {
    const int g = idx / D, d = idx % D;
    float M = TS_NEG_INF;
#pragma unroll
    for (int k = 0; k < NG; ++k) M = fmaxf(M, s_m[k][g]);
    float L = 0.f, A = 0.f;
#pragma unroll
    for (int k = 0; k < NG; ++k) {
      float mk = s_m[k][g];
      if (mk == TS_NEG_INF) continue;
      float w = exp2f(mk - M);
      L = fmaf(s_l[k][g], w, L);
      A = fmaf(s_acc[k][g][d], w, A);
    }
    if (S == 1) {
      out[(head_row + g) * D + d] = Elt<T>::from(A / L);
    } else {
      part_acc[((head_row + g) * S + split) * D + d] = A / L;
      if (d == 0) {
        float *ml = part_ml + ((head_row + g) * S + split) * 2;
        ml[0] = M; ml[1] = L;
      }
    }
  }
}

// Merge the S normalised partials of every (b, query head): grid (B * Hq), D threads.
template <typename T, int D>
__global__ void __launch_bounds__(D) paged_decode_reduce(
    const float *__restrict__ part_acc, const float *__restrict__ part_ml, int S, u16 *__restrict__ out)
{
  const size_t row = blockIdx.x;
  const int d = threadIdx.x;
  const float *ml = part_ml + row * S * 2;
  float M = TS_NEG_INF;
  for (int s = 0; s < S; ++s) if (ml[2 * s + 1] > 0.f) M = fmaxf(M, ml[2 * s]);
  float L = 0.f, A = 0.f;
  for (int s = 0; s < S; ++s) {
    float ls = ml[2 * s + 1];
    if (!(ls > 0.f)) continue;
    float w = ls * exp2f(ml[2 * s] - M);
    L += w;
    A = fmaf(part_acc[(row * S + s) * D + d], w, A);
  }
  out[row * D + d] = Elt<T>::from(A / L);
}

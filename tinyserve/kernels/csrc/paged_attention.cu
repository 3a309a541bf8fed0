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

// Tensor-core variant of paged_decode_attention (same grid, arguments and invariants; adds `counters`).
// MINB: CTAs per multiprocessor the register allocation must allow (2: no spills; 3: more warps).
// NSUB: 16-token steps whose K/V loads a warp issues together (more bytes in flight, fewer serial trips).
//
// Per warp and step of 16 tokens: S[head, token] = Q . K^T as two m16n8k16 tiles per 16 d (A = the
// G query heads of the KV head in rows 0..G-1, rows G..15 zero; B = K^T, column n = token), online
// softmax in fp32 (log2 domain), then O += P . V as D/8 tiles (A = P packed to 16 bits straight from
// the S accumulators, B = V with pairs of tokens packed by byte permutes). The contraction dims are
// permuted so that every K and V access is a 16-byte load straight from global memory into registers
// (each CTA reads each K/V byte of its split once; no shared-memory staging): in the Q.K^T tile of
// 16-d chunk c, k-slots tig*2+{0,1} hold d = (c/2)*32 + tig*8 + (c%2)*4 + {0,1} and slots tig*2+8+{0,1}
// hold d + 2; in P.V tile j, column n holds d = (j/8)*64 + n*8 + j%8.
// The 4 warps of a CTA take interleaved 16-token steps of the split and merge in shared memory.
// With counters != null and S > 1, the last CTA of each (b, KV head) to finish (atomic ticket, reset to
// 0 by that CTA) merges the S partials and writes the output, so no reduce launch is needed; counters
// must start at 0 and be used by one launch at a time.
// COOP (query-aware decode in one launch): the CTAs of a row first score and select the row's pages
// together (coop_select_row: kmin / kmax metadata, `scores` [B * Hkv, max_pages] scratch, the row's barrier
// in barriers[2 * row], [2 * row + 1], which needs the whole grid resident at once), then attend their split
// of the selection; split 0 writes the selection to sel / nsel (outputs here; sel_k = pages kept a row).
template <typename T, int D, int G, int MINB, int NSUB, bool COOP>
__global__ void __launch_bounds__(128, MINB) paged_decode_mma(
    const u16 *__restrict__ q, const u16 *__restrict__ kc, const u16 *__restrict__ vc,
    const int *__restrict__ bt, const int *__restrict__ seq_lens, int *__restrict__ sel,
    int *__restrict__ nsel, int bt_stride, int sel_k, int hkv, int bs_shift, int pages_per_split,
    float scale_log2, float *__restrict__ part_acc, float *__restrict__ part_ml, int *__restrict__ counters,
    const u16 *__restrict__ kmin, const u16 *__restrict__ kmax, float *__restrict__ scores,
    unsigned *__restrict__ barriers, int max_pages, int num_sinks, u16 *__restrict__ out)
{
  constexpr int NKL = D / 32;    // 16-byte K loads per token per lane
  constexpr int NQC = D / 16;    // 16-d chunks of Q.K^T
  constexpr int NVH = D / 64;    // 16-byte V loads per token per lane
  constexpr int NT = D / 8;      // n-tiles of P.V
  const int split = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const int S = gridDim.x;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int gid = lane >> 2, tig = lane & 3;
  const int bs = 1 << bs_shift;
  const int hq = hkv * G;

  // [pages_per_split] block ids of the split's pages, then (with a selection) their logical page numbers
  extern __shared__ int s_phys[];
  int *s_lp = s_phys + pages_per_split;
  __shared__ float s_m[4][G], s_l[4][G];
  __shared__ __align__(16) float s_acc[4][G][D];
  __shared__ float s_M[G], s_L[G];   // the CTA's merged max and sum per query head
  __shared__ int s_last;

  const int seq = seq_lens[b];
  const int p0 = split * pages_per_split;
  int nselected;
  if constexpr (COOP) {
    // [sel_k] the row's selection, [max_pages] its block ids, then [max_pages] order keys of its candidates
    int *s_sel = s_lp + pages_per_split;
    int *s_bt = s_sel + sel_k;
    const int row = b * hkv + h;
    const int *btr = bt + (size_t)b * bt_stride;
    const int npages = (seq + bs - 1) >> bs_shift;
    for (int j = tid; j < npages; j += blockDim.x) s_bt[j] = btr[j];   // lands while the row is scored
    nselected = coop_select_row<T, D, G, 128>(
        q, kmin, kmax, btr, npages, b, h, hkv, split, S, sel_k, num_sinks,
        scores + (size_t)row * max_pages, barriers + 2 * row, barriers + 2 * row + 1,
        reinterpret_cast<u32 *>(s_bt + max_pages), s_sel);
    for (int j = tid; j < pages_per_split && p0 + j < sel_k; j += blockDim.x) {
      const int lp = s_sel[p0 + j];
      s_lp[j] = lp;
      s_phys[j] = lp >= 0 ? s_bt[lp] : 0;
    }
    if (split == 0) {
      for (int j = tid; j < sel_k; j += blockDim.x) sel[(size_t)row * sel_k + j] = s_sel[j];
      if (tid == 0) nsel[row] = nselected;
    }
  } else if (sel) {
    nselected = nsel[b * hkv + h];
  } else {
    nselected = 0;
  }
  if (!COOP && sel) {
    // The split's selected pages and their block ids are read before the list length arrives (the list
    // is -1 past its length; nothing past the length is used).
    const int *row = sel + ((size_t)b * hkv + h) * sel_k;
    for (int j = tid; j < pages_per_split && p0 + j < sel_k; j += blockDim.x) {
      const int lp = row[p0 + j];
      s_lp[j] = lp;
      s_phys[j] = lp >= 0 ? bt[(size_t)b * bt_stride + lp] : 0;
    }
  }
  const int nlist = sel ? nselected : (seq + bs - 1) >> bs_shift;
  const int np = min(pages_per_split, nlist - p0);
  const size_t head_row = (size_t)b * hq + (size_t)h * G;

  if (np > 0) {
    if (!sel)
      for (int j = tid; j < np; j += blockDim.x) s_phys[j] = bt[(size_t)b * bt_stride + p0 + j];
    __syncthreads();
    const int last_lp = sel ? s_lp[np - 1] : p0 + np - 1;
    const int ntok = (np - 1) * bs + min(bs, seq - last_lp * bs);

    // Q as the A operand: row gid = query head gid (zero past G); R0 / R2 = low / high k pair of chunk c
    u32 qa[NQC][2];
#pragma unroll
    for (int i = 0; i < NKL; ++i) {
      uint4 v = make_uint4(0u, 0u, 0u, 0u);
      if (gid < G) v = ldg16(q + (head_row + gid) * D + i * 32 + tig * 8);
      qa[2 * i][0] = v.x; qa[2 * i][1] = v.y;
      qa[2 * i + 1][0] = v.z; qa[2 * i + 1][1] = v.w;
    }
    float acc[NT][2];
#pragma unroll
    for (int j = 0; j < NT; ++j) { acc[j][0] = 0.f; acc[j][1] = 0.f; }
    float m = TS_NEG_INF, l = 0.f;
    const size_t row_stride = (size_t)hkv * D;
    const u16 *kh = kc + (size_t)h * D;
    const u16 *vh = vc + (size_t)h * D;

    for (int base = warp * 16 * NSUB; base < ntok; base += 64 * NSUB) {
      uint4 kr[NSUB][2][NKL], vr[NSUB][4][NVH];
#pragma unroll
      for (int sub = 0; sub < NSUB; ++sub) {
        // K rows: tokens base' + gid (tile 0) and base' + 8 + gid (tile 1), base' = base + 16 * sub
#pragma unroll
        for (int n = 0; n < 2; ++n) {
          const int t = base + sub * 16 + n * 8 + gid;
          if (t < ntok) {
            const u16 *p = kh + ((size_t)s_phys[t >> bs_shift] * bs + (t & (bs - 1))) * row_stride + tig * 8;
#pragma unroll
            for (int i = 0; i < NKL; ++i) kr[sub][n][i] = ld_stream16(p + i * 32);
          } else {
#pragma unroll
            for (int i = 0; i < NKL; ++i) kr[sub][n][i] = make_uint4(0u, 0u, 0u, 0u);
          }
        }
        // V rows: tokens base' + tig*2 + {0, 1, 8, 9}
#pragma unroll
        for (int r = 0; r < 4; ++r) {
          const int t = base + sub * 16 + tig * 2 + (r & 1) + (r >> 1) * 8;
          if (t < ntok) {
            const u16 *p = vh + ((size_t)s_phys[t >> bs_shift] * bs + (t & (bs - 1))) * row_stride + gid * 8;
#pragma unroll
            for (int i = 0; i < NVH; ++i) vr[sub][r][i] = ld_stream16(p + i * 64);
          } else {
#pragma unroll
            for (int i = 0; i < NVH; ++i) vr[sub][r][i] = make_uint4(0u, 0u, 0u, 0u);
          }
        }
      }
#pragma unroll
      for (int sub = 0; sub < NSUB; ++sub) {
        // S = Q . K^T: c[n][0..1] = head gid, tokens base' + 8n + tig*2 + {0,1}
        float c[2][4];
#pragma unroll
        for (int n = 0; n < 2; ++n) {
          c[n][0] = c[n][1] = c[n][2] = c[n][3] = 0.f;
#pragma unroll
          for (int cc = 0; cc < NQC; ++cc) {
            const uint4 &kv = kr[sub][n][cc >> 1];
            const u32 b0 = (cc & 1) ? kv.z : kv.x;
            const u32 b1 = (cc & 1) ? kv.w : kv.y;
            Mma<T>::run(c[n], qa[cc][0], 0u, qa[cc][1], 0u, b0, b1);
          }
        }
        float s[4];
#pragma unroll
        for (int n = 0; n < 2; ++n)
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const int t = base + sub * 16 + n * 8 + tig * 2 + e;
            s[n * 2 + e] = t < ntok ? c[n][e] * scale_log2 : TS_NEG_INF;
          }
        float mx = fmaxf(fmaxf(s[0], s[1]), fmaxf(s[2], s[3]));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        const float mn = fmaxf(m, mx);   // finite: token `base` (sub-step 0) is in range
        const float alpha = exp2f(m - mn);
        m = mn;
        float p[4];
#pragma unroll
        for (int e = 0; e < 4; ++e) p[e] = exp2f(s[e] - mn);
        l = l * alpha + ((p[0] + p[1]) + (p[2] + p[3]));
        const u32 pa0 = Mma<T>::pack(p[0], p[1]);   // tokens tig*2 + {0,1}
        const u32 pa2 = Mma<T>::pack(p[2], p[3]);   // tokens 8 + tig*2 + {0,1}
#pragma unroll
        for (int j = 0; j < NT; ++j) {
          const int hv = j >> 3, e = j & 7;
          const u32 sel_bytes = (e & 1) ? 0x7632u : 0x5410u;
          const u32 w0 = word_of(vr[sub][0][hv], e >> 1), w1 = word_of(vr[sub][1][hv], e >> 1);
          const u32 w2 = word_of(vr[sub][2][hv], e >> 1), w3 = word_of(vr[sub][3][hv], e >> 1);
          const u32 b0 = __byte_perm(w0, w1, sel_bytes);
          const u32 b1 = __byte_perm(w2, w3, sel_bytes);
          float cv[4] = {acc[j][0] * alpha, acc[j][1] * alpha, 0.f, 0.f};
          Mma<T>::run(cv, pa0, 0u, pa2, 0u, b0, b1);
          acc[j][0] = cv[0]; acc[j][1] = cv[1];
        }
      }
    }
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    if (gid < G) {
      if (tig == 0) { s_m[warp][gid] = m; s_l[warp][gid] = l; }
#pragma unroll
      for (int j = 0; j < NT; ++j) {
        const int d0 = (j >> 3) * 64 + tig * 16 + (j & 7);
        s_acc[warp][gid][d0] = acc[j][0];
        s_acc[warp][gid][d0 + 8] = acc[j][1];
      }
    }
    __syncthreads();
    if (tid < G) {
      float Mx = TS_NEG_INF;
#pragma unroll
      for (int w = 0; w < 4; ++w) Mx = fmaxf(Mx, s_m[w][tid]);
      float Ls = 0.f;
#pragma unroll
      for (int w = 0; w < 4; ++w)
        if (s_m[w][tid] != TS_NEG_INF) Ls = fmaf(s_l[w][tid], exp2f(s_m[w][tid] - Mx), Ls);
      s_M[tid] = Mx; s_L[tid] = Ls;
    }
    __syncthreads();
    for (int idx = tid; idx < G * D; idx += blockDim.x) {
      const int g = idx / D, d = idx % D;
      float A = 0.f;
#pragma unroll
      for (int w = 0; w < 4; ++w) {
        const float mw = s_m[w][g];
        if (mw != TS_NEG_INF) A = fmaf(s_acc[w][g][d], exp2f(mw - s_M[g]), A);
      }
      if (S == 1) {
        out[(head_row + g) * D + d] = Elt<T>::from(A / s_L[g]);
      } else {
        part_acc[((head_row + g) * S + split) * D + d] = A / s_L[g];
      }
    }
    if (S > 1 && tid < G) {
      float *ml = part_ml + ((head_row + tid) * S + split) * 2;
      ml[0] = s_M[tid]; ml[1] = s_L[tid];
    }
  } else if (tid < G) {   // empty split (ragged batch): contributes nothing
    float *ml = part_ml + ((head_row + tid) * S + split) * 2;
    ml[0] = TS_NEG_INF; ml[1] = 0.f;
  }
  if (S == 1 || counters == nullptr) return;

  // last CTA of this (b, KV head) merges the S partials
  __threadfence();
  __syncthreads();
  if (tid == 0) s_last = atomicAdd(&counters[b * hkv + h], 1) == S - 1;
  __syncthreads();
  if (!s_last) return;
  __threadfence();
  constexpr int Q4 = D / 4;
  for (int idx = tid; idx < G * Q4; idx += blockDim.x) {
    const int g = idx / Q4, d4 = idx % Q4;
    const size_t row = head_row + g;
    const float *ml = part_ml + row * S * 2;
    float Mx = TS_NEG_INF;
    for (int s2 = 0; s2 < S; ++s2) {
      const float2 v = __ldcg(reinterpret_cast<const float2 *>(ml) + s2);
      if (v.y > 0.f) Mx = fmaxf(Mx, v.x);
    }
    float Ls = 0.f;
    float4 A = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll 4
    for (int s2 = 0; s2 < S; ++s2) {
      const float2 v = __ldcg(reinterpret_cast<const float2 *>(ml) + s2);
      if (!(v.y > 0.f)) continue;
      const float w = v.y * exp2f(v.x - Mx);
      const float4 a = __ldcg(reinterpret_cast<const float4 *>(part_acc + (row * S + s2) * D) + d4);
      Ls += w;
      A.x = fmaf(a.x, w, A.x); A.y = fmaf(a.y, w, A.y); A.z = fmaf(a.z, w, A.z); A.w = fmaf(a.w, w, A.w);
    }
    u16 *o = out + row * D + d4 * 4;
    const float inv = 1.f / Ls;
    o[0] = Elt<T>::from(A.x * inv); o[1] = Elt<T>::from(A.y * inv);
    o[2] = Elt<T>::from(A.z * inv); o[3] = Elt<T>::from(A.w * inv);
  }
  if (tid == 0) counters[b * hkv + h] = 0;
}

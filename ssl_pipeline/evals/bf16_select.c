/* The selection and exact re-scoring steps of ssl_pipeline's bf16 k-NN search (bf16_search.py).
 *
 * For a block of queries, torch computes their bf16 similarities to every bank row (on Intel
 * AMX, oneDNN's bf16 kernels) one panel of W queries at a time, laid out (nb, W). Then:
 *   1. select_candidates, per panel: for each query every bank row that can be among its k most
 *      similar given the proven error bound of the bf16 similarities;
 *   2. rescore: those rows' float32 similarities from the float32 vectors;
 *   3. top_k: the k best, most similar first (ties: lower row first).
 * Each step takes a range (columns, bank rows, queries) so that threads can share it; ctypes
 * releases the GIL. Compiled on first use with the system's C compiler
 * (bf16_search.compiled_kernel).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef __AVX512BW__
#include <immintrin.h>
#endif

#define CHUNK 32 /* bank rows per chunk: the unit of the lower bound and of the skip test */

/* bf16 bits -> a 16-bit key with the order of the values (sign-magnitude to offset binary) */
static inline uint16_t order_key(uint16_t h) { return h ^ (uint16_t)(((int16_t)h >> 15) | 0x8000); }
static inline uint16_t key_bits(uint16_t k) { return (k & 0x8000) ? (k ^ 0x8000) : (uint16_t)~k; }
static inline float bf16_value(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}
/* the largest bf16 value <= x (x finite) */
static inline uint16_t bf16_at_most(float x) {
    uint32_t u;
    memcpy(&u, &x, 4);
    uint16_t h = (uint16_t)(u >> 16);
    if ((u & 0xFFFF) && (u >> 31)) h += 1; /* negative: truncation rounded up; step down */
    return h;
}

/* float32 dot product with 32 independent partial sums: one running sum would wait on the
 * latency of every multiply-add */
static inline float dot(const float *a, const float *b, int64_t d) {
    float acc[32] = {0}, s = 0.f;
    int64_t t = 0;
    for (; t + 32 <= d; t += 32)
        for (int i = 0; i < 32; i++) acc[i] += a[t + i] * b[t + i];
    for (; t < d; t++) s += a[t] * b[t];
    for (int i = 0; i < 32; i++) s += acc[i];
    return s;
}

typedef struct { float sim; int64_t row; } hit_t;
typedef struct { hit_t *hits; int64_t n, cap; } hits_t;

static inline int better(hit_t a, hit_t b) { return a.sim > b.sim || (a.sim == b.sim && a.row < b.row); }

static void sort_hits(hit_t *a, int64_t n) { /* best first */
    while (n > 16) {
        hit_t p = a[n / 2];
        int64_t i = 0, j = n - 1;
        while (i <= j) {
            while (better(a[i], p)) i++;
            while (better(p, a[j])) j--;
            if (i <= j) { hit_t t = a[i]; a[i] = a[j]; a[j] = t; i++; j--; }
        }
        if (j + 1 < n - i) { sort_hits(a, j + 1); a += i; n -= i; }
        else { sort_hits(a + i, n - i); n = j + 1; }
    }
    for (int64_t i = 1; i < n; i++) {
        hit_t t = a[i];
        int64_t j = i;
        while (j > 0 && better(t, a[j - 1])) { a[j] = a[j - 1]; j--; }
        a[j] = t;
    }
}

static void best_first(hit_t *a, int64_t n, int64_t k) { /* the k best to a[0..k), any order */
    int64_t lo = 0, hi = n - 1;
    while (lo < hi) {
        hit_t p = a[lo + (hi - lo) / 2];
        int64_t i = lo, j = hi;
        while (i <= j) {
            while (better(a[i], p)) i++;
            while (better(p, a[j])) j--;
            if (i <= j) { hit_t t = a[i]; a[i] = a[j]; a[j] = t; i++; j--; }
        }
        if (k - 1 <= j) hi = j;
        else if (k - 1 >= i) lo = i;
        else return;
    }
}

/* the k-th largest of n keys a[0], a[stride], ... (1 <= k <= n): two 256-bin radix passes */
static uint16_t kth_largest_key(const uint16_t *a, int64_t n, int64_t stride, int64_t k) {
    int64_t high[256] = {0}, low[256] = {0}, above = 0;
    for (int64_t c = 0; c < n; c++) high[a[c * stride] >> 8]++;
    int hb = 255;
    while (above + high[hb] < k) above += high[hb--];
    for (int64_t c = 0; c < n; c++) {
        uint16_t v = a[c * stride];
        if ((v >> 8) == hb) low[v & 255]++;
    }
    int lb = 255;
    while (above + low[lb] < k) above += low[lb--];
    return (uint16_t)((hb << 8) | lb);
}

/* Candidates of a block of queries: per query, bank rows in increasing order (int32) and,
 * once re-scored, their float32 similarities. */
typedef struct { int32_t *rows; float *sims; int64_t n, cap; } cands_t;
typedef struct { int64_t nq; cands_t *q; } block_t;

void *block_new(int64_t nq) {
    block_t *b = malloc(sizeof(block_t));
    if (!b) return NULL;
    b->nq = nq;
    b->q = calloc(nq, sizeof(cands_t));
    if (!b->q) { free(b); return NULL; }
    return b;
}

void block_free(void *handle) {
    block_t *b = handle;
    if (!b) return;
    for (int64_t q = 0; q < b->nq; q++) { free(b->q[q].rows); free(b->q[q].sims); }
    free(b->q);
    free(b);
}

static int add_row(cands_t *c, int32_t row) {
    if (c->n == c->cap) {
        int64_t cap = c->cap ? 2 * c->cap : 512;
        int32_t *rows = realloc(c->rows, sizeof(int32_t) * cap);
        if (!rows) return -1;
        c->rows = rows;
        float *sims = realloc(c->sims, sizeof(float) * cap);
        if (!sims) return -1;
        c->sims = sims;
        c->cap = cap;
    }
    c->rows[c->n++] = row;
    return 0;
}

/* Step 1, one panel: sims (nb, W) bf16 bits, column r = query q_offset + r of the block; handles
 * columns [c0, c1). band[r] bounds |the bf16 product before its output rounding - the float32
 * product| for column r. Adds to each query's candidates every row that can be among its k
 * most similar. Returns 0, or -1 when memory ran out. */
int64_t select_candidates(const uint16_t *sims, int64_t nb, int64_t W, int64_t c0, int64_t c1,
                          const float *band, int64_t k, void *handle, int64_t q_offset) {
    block_t *blk = handle;
    int64_t nc = c1 - c0, chunks = (nb + CHUNK - 1) / CHUNK;
    if (nc <= 0) return 0;
    uint16_t *chunk_max = malloc(sizeof(uint16_t) * chunks * nc); /* (chunk, column) keys */
    uint16_t *cut = malloc(sizeof(uint16_t) * nc);
    if (!chunk_max || !cut) { free(chunk_max); free(cut); return -1; }
    for (int64_t c = 0; c < chunks; c++) { /* each chunk's largest similarity, per column */
        int64_t b = c * CHUNK, e = b + CHUNK < nb ? b + CHUNK : nb;
        uint16_t *m = chunk_max + c * nc;
        const uint16_t *row = sims + b * W + c0;
        for (int64_t r = 0; r < nc; r++) m[r] = order_key(row[r]);
        for (int64_t j = b + 1; j < e; j++) {
            row = sims + j * W + c0;
            for (int64_t r = 0; r < nc; r++) {
                uint16_t v = order_key(row[r]);
                m[r] = v > m[r] ? v : m[r];
            }
        }
    }
    /* Per column the cut: with out = the bf16 output, s = the product before output rounding
     * and x = the float32 product, |out - s| <= 2^-9 |s| (round to nearest; subnormals: within
     * band's absolute term), so |out - s| <= 2^-9 / (1 - 2^-9) |out| <= u |out|, and
     * |s - x| <= band. v - u|v| and v + u|v| increase with v. The k-th largest chunk maximum
     * L: >= k rows have out >= L, so the k-th largest x is >= T = L - u|L| - band. A row can
     * reach T only if out + u|out| + band >= T. */
    const float u = (1.0f / 512.0f) * (1.0f + 1.0f / 256.0f);
    for (int64_t r = 0; r < nc; r++) {
        if (chunks < k) { cut[r] = 0; continue; } /* fewer chunks than k: every row */
        float L = bf16_value(key_bits(kth_largest_key(chunk_max + r, chunks, nc, k)));
        float t = L - u * fabsf(L) - 2.0f * band[c0 + r];
        t = t >= 0 ? t / (1.0f + u) : t / (1.0f - u); /* the out at which out + u|out| = t */
        t -= 1e-6f * (fabsf(t) + 1e-3f);               /* float32 rounding in these lines */
        cut[r] = order_key(bf16_at_most(t));
    }
    int failed = 0;
    for (int64_t c = 0; c < chunks && !failed; c++) { /* rows at or above the cut */
        int64_t b = c * CHUNK, e = b + CHUNK < nb ? b + CHUNK : nb, r = 0;
        const uint16_t *m = chunk_max + c * nc;
#ifdef __AVX512BW__
        /* 32 columns a compare: order keys of the row against the columns' cuts */
        for (; r + 32 <= nc && !failed; r += 32) {
            __m512i cuts = _mm512_loadu_si512(cut + r);
            if (!_mm512_cmpge_epu16_mask(_mm512_loadu_si512(m + r), cuts)) continue;
            for (int64_t j = b; j < e && !failed; j++) {
                __m512i h = _mm512_loadu_si512(sims + j * W + c0 + r);
                __m512i key = _mm512_xor_si512(h, _mm512_or_si512(_mm512_srai_epi16(h, 15),
                                                                  _mm512_set1_epi16((short)0x8000)));
                for (__mmask32 hit = _mm512_cmpge_epu16_mask(key, cuts); hit; hit &= hit - 1)
                    if (add_row(blk->q + q_offset + c0 + r + __builtin_ctz(hit), (int32_t)j)) failed = 1;
            }
        }
#endif
        for (; r < nc && !failed; r++) {
            if (m[r] < cut[r]) continue;
            cands_t *cand = blk->q + q_offset + c0 + r;
            for (int64_t j = b; j < e; j++)  /* the chunk's 32 x W block is in L1 by now */
                if (order_key(sims[j * W + c0 + r]) >= cut[r] && add_row(cand, (int32_t)j)) { failed = 1; break; }
        }
    }
    free(chunk_max); free(cut);
    return failed ? -1 : 0;
}

/* Step 2: the float32 similarity of every candidate of queries [q0, q1) in bank rows
 * [row0, row1), bank-row-major so that each bank row is read from memory once for all the
 * queries that need it. queries: the block's (nq, d); bank: (nb, d). Returns 0, or -1 when
 * memory ran out. */
int64_t rescore(void *handle, int64_t q0, int64_t q1, int64_t row0, int64_t row1,
                const float *queries, const float *bank, int64_t d) {
    block_t *blk = handle;
    int64_t nq = q1 - q0;
    if (nq <= 0) return 0;
    int64_t *at = malloc(sizeof(int64_t) * nq);
    if (!at) return -1;
    for (int64_t q = 0; q < nq; q++) { /* the first candidate at or after row0 */
        cands_t *c = blk->q + q0 + q;
        int64_t lo = 0, hi = c->n;
        while (lo < hi) { int64_t mid = (lo + hi) / 2; if (c->rows[mid] < row0) lo = mid + 1; else hi = mid; }
        at[q] = lo;
    }
    const int64_t step = 64; /* bank rows per step: 64 x d float32 stay in L2 across queries */
    for (int64_t b = row0; b < row1; b += step) {
        int64_t e = b + step < row1 ? b + step : row1;
        for (int64_t q = 0; q < nq; q++) {
            cands_t *c = blk->q + q0 + q;
            const float *qv = queries + (q0 + q) * d;
            int64_t i = at[q];
            for (; i < c->n && c->rows[i] < e; i++) c->sims[i] = dot(qv, bank + (int64_t)c->rows[i] * d, d);
            at[q] = i;
        }
    }
    free(at);
    return 0;
}

/* Step 3: for queries [q0, q1) the k best re-scored candidates, best first (ties: lower row
 * first), into out_sims/out_rows (nq, k) rows q; -inf and -1 past a query's candidates.
 * Returns the number of candidates of those queries, or -1 when memory ran out. */
int64_t top_k(void *handle, int64_t q0, int64_t q1, int64_t k, float *out_sims, int64_t *out_rows) {
    block_t *blk = handle;
    int64_t total = 0, cap = 0;
    hit_t *hits = NULL;
    for (int64_t q = q0; q < q1; q++) {
        cands_t *c = blk->q + q;
        total += c->n;
        if (c->n > cap) {
            cap = c->n;
            hit_t *grown = realloc(hits, sizeof(hit_t) * cap);
            if (!grown) { free(hits); return -1; }
            hits = grown;
        }
        for (int64_t i = 0; i < c->n; i++) { hits[i].sim = c->sims[i]; hits[i].row = c->rows[i]; }
        int64_t kk = c->n < k ? c->n : k;
        if (c->n > kk) best_first(hits, c->n, kk);
        sort_hits(hits, kk);
        for (int64_t t = 0; t < kk; t++) { out_sims[q * k + t] = hits[t].sim; out_rows[q * k + t] = hits[t].row; }
        for (int64_t t = kk; t < k; t++) { out_sims[q * k + t] = -INFINITY; out_rows[q * k + t] = -1; }
    }
    free(hits);
    return total;
}

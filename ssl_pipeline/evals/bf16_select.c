/* The selection and exact re-scoring step of ssl_pipeline's bf16 k-NN search (bf16_search.py).
 *
 * Input: one block of queries' bf16 similarities to every bank row, computed by torch (on
 * Intel AMX, oneDNN's bf16 kernels), laid out as panels (P, nb, W): query r of the block is
 * column r % W of panel r / W. For each query this finds every bank row that can be among its k
 * most similar given the proven error bound of the bf16 similarities, re-scores those rows in
 * float32 from the float32 vectors, and writes the k best, most similar first (ties: lower row
 * first). Compiled on first use with the system's C compiler (bf16_search.compiled_kernel).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

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

static int add_hit(hits_t *h, float sim, int64_t row) {
    if (h->n == h->cap) {
        int64_t cap = h->cap ? 2 * h->cap : 512;
        hit_t *grown = realloc(h->hits, sizeof(hit_t) * cap);
        if (!grown) return -1;
        h->hits = grown;
        h->cap = cap;
    }
    h->hits[h->n].sim = sim;
    h->hits[h->n].row = row;
    h->n++;
    return 0;
}

/* Queries of panels [p0, p1) below n_queries. band[q] bounds |the bf16 product before its
 * output rounding - the float32 product| for query q (bf16_search.py derives it). queries
 * (n_queries, d) and bank (nb, d) are float32; out_sims/out_rows (n_queries, k). Returns the
 * number of rows re-scored, or -1 when memory ran out. */
int64_t select_and_rescore(const uint16_t *sims, int64_t nb, int64_t W, int64_t p0, int64_t p1,
                           int64_t n_queries, const float *queries, const float *bank, int64_t d,
                           int64_t k, const float *band, float *out_sims, int64_t *out_rows) {
    int64_t q0 = p0 * W, q1 = p1 * W < n_queries ? p1 * W : n_queries, nq = q1 - q0;
    int64_t chunks = (nb + CHUNK - 1) / CHUNK, rescored = 0, failed = 0;
    if (nq <= 0) return 0;
    uint16_t *chunk_max = malloc(sizeof(uint16_t) * chunks * (p1 - p0) * W); /* (panel, chunk, W) keys */
    uint16_t *cut = malloc(sizeof(uint16_t) * nq);
    hits_t *found = calloc(nq, sizeof(hits_t));
    if (!chunk_max || !cut || !found) { free(chunk_max); free(cut); free(found); return -1; }

    for (int64_t p = p0; p < p1; p++) { /* 1. each chunk's largest similarity, per query */
        const uint16_t *panel = sims + p * nb * W;
        for (int64_t c = 0; c < chunks; c++) {
            int64_t b = c * CHUNK, e = b + CHUNK < nb ? b + CHUNK : nb;
            uint16_t *m = chunk_max + ((p - p0) * chunks + c) * W;
            for (int64_t r = 0; r < W; r++) m[r] = order_key(panel[b * W + r]);
            for (int64_t j = b + 1; j < e; j++) {
                const uint16_t *row = panel + j * W;
                for (int64_t r = 0; r < W; r++) {
                    uint16_t v = order_key(row[r]);
                    m[r] = v > m[r] ? v : m[r];
                }
            }
        }
    }
    /* 2. per query the cut: with out = bf16 output, s = the product before output rounding and
     * x = the float32 product, |out - s| <= 2^-9 |s| <= u |out| (u = 2^-8) and |s - x| <= band.
     * The k-th largest chunk maximum L: >= k rows have out >= L, so the k-th largest x is
     * >= T = L - u|L| - band. A row can reach T only if out + u|out| + band >= T. */
    const float u = 1.0f / 256.0f;
    for (int64_t q = q0; q < q1; q++) {
        if (chunks < k) { cut[q - q0] = 0; continue; } /* fewer chunks than k: every row */
        int64_t p = q / W, r = q % W;
        uint16_t lk = kth_largest_key(chunk_max + (p - p0) * chunks * W + r, chunks, W, k);
        float L = bf16_value(key_bits(lk));
        float t = L - u * fabsf(L) - 2.0f * band[q];
        t = t >= 0 ? t / (1.0f + u) : t / (1.0f - u); /* the out at which out + u|out| = t */
        t -= 1e-6f * (fabsf(t) + 1e-3f);               /* float32 rounding in these lines */
        cut[q - q0] = order_key(bf16_at_most(t));
    }
    /* 3. rows at or above the cut re-scored in float32, chunk by chunk so that a chunk's bank
     * rows are read from memory once for all the block's queries that need them */
    for (int64_t c = 0; c < chunks && !failed; c++) {
        int64_t b = c * CHUNK, e = b + CHUNK < nb ? b + CHUNK : nb;
        for (int64_t q = q0; q < q1; q++) {
            int64_t p = q / W, r = q % W;
            uint16_t t = cut[q - q0];
            if (chunk_max[((p - p0) * chunks + c) * W + r] < t) continue;
            const uint16_t *panel = sims + p * nb * W;
            const float *qv = queries + q * d;
            for (int64_t j = b; j < e; j++) {
                if (order_key(panel[j * W + r]) < t) continue;
                const float *x = bank + j * d;
                float s = 0.f;
                _Pragma("omp simd reduction(+:s)")
                for (int64_t i = 0; i < d; i++) s += qv[i] * x[i];
                if (add_hit(found + (q - q0), s, j)) { failed = 1; break; }
            }
        }
    }
    /* 4. the k best of each query's re-scored rows, best first */
    for (int64_t q = q0; q < q1; q++) {
        hits_t *h = found + (q - q0);
        rescored += h->n;
        int64_t kk = h->n < k ? h->n : k;
        if (!failed) {
            if (h->n > kk) best_first(h->hits, h->n, kk);
            sort_hits(h->hits, kk);
            for (int64_t t = 0; t < kk; t++) {
                out_sims[q * k + t] = h->hits[t].sim;
                out_rows[q * k + t] = h->hits[t].row;
            }
            for (int64_t t = kk; t < k; t++) { out_sims[q * k + t] = -INFINITY; out_rows[q * k + t] = -1; }
        }
        free(h->hits);
    }
    free(chunk_max); free(cut); free(found);
    return failed ? -1 : rescored;
}

/* The kernel of ssl_pipeline's bf16 k-NN search (bf16_search.py), for a block of queries:
 *   1. the rows that can be among each query's k most similar given the proven error bound of
 *      bf16 similarities: amx_select computes the similarities itself on Intel AMX tiles,
 *      looking at each 32 x 32 block in L1 (to_tiles lays the bank and queries out for it);
 *      elsewhere torch computes them one panel of W queries at a time, laid out (nb, W), and
 *      select_candidates reads the panel;
 *   2. rescore: those rows' float32 similarities from the float32 vectors;
 *   3. top_k: the k best, most similar first (ties: lower row first).
 * Each step takes a range (queries, columns or bank rows) so that threads can share it; ctypes
 * releases the GIL. Compiled on first use with the system's C compiler
 * (bf16_search.compiled_kernel); the AMX step needs -march=native on a CPU with AMX-BF16.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX512F__) || defined(__AVX512BW__) || (defined(__AMX_TILE__) && defined(__AMX_BF16__))
#include <immintrin.h>
#endif
#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__) && defined(__linux__)
#define HAVE_AMX 1
#include <sys/syscall.h>
#include <unistd.h>
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
#ifdef __AVX512F__
    __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps();
    int64_t t = 0;
    for (; t + 32 <= d; t += 32) {
        s0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + t), _mm512_loadu_ps(b + t), s0);
        s1 = _mm512_fmadd_ps(_mm512_loadu_ps(a + t + 16), _mm512_loadu_ps(b + t + 16), s1);
    }
    for (; t < d; t += 16) {
        __mmask16 m = d - t >= 16 ? 0xFFFF : (__mmask16)((1u << (d - t)) - 1);
        s0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, a + t), _mm512_maskz_loadu_ps(m, b + t), s0);
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(s0, s1));
#else
    float acc[32] = {0}, s = 0.f;
    int64_t t = 0;
    for (; t + 32 <= d; t += 32)
        for (int i = 0; i < 32; i++) acc[i] += a[t + i] * b[t + i];
    for (; t < d; t++) s += a[t] * b[t];
    for (int i = 0; i < 32; i++) s += acc[i];
    return s;
#endif
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
typedef struct { int32_t *rows; float *sims; int64_t n, cap, next; } cands_t; /* next: amx_select */
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

/* room for at least `least` rows in a query's list: its capacity doubled (from 512) until it
 * fits, with 16 rows of slack past it for whole-vector stores. 0, or -1 when memory ran out */
static int grow(cands_t *c, int64_t least) {
    if (least <= c->cap) return 0;
    int64_t cap = c->cap ? 2 * c->cap : 512;
    while (cap < least) cap *= 2;
    int32_t *rows = realloc(c->rows, sizeof(int32_t) * (cap + 16));
    if (!rows) return -1;
    c->rows = rows;
    float *sims = realloc(c->sims, sizeof(float) * (cap + 16));
    if (!sims) return -1;
    c->sims = sims;
    c->cap = cap;
    return 0;
}

static int add_row(cands_t *c, int32_t row) {
    if (grow(c, c->n + 1)) return -1;
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
 * [row0, row1), times q_scale[query] and bank_scale[row] unless q_scale is NULL, bank-row-major so that each bank row is read from memory once for all the
 * queries that need it: the (query, candidate) pairs are first sorted by bank row into buckets
 * of STEP rows (kept in L2 while their pairs are scored). queries: the block's (nq, d); bank:
 * (nb, d). Returns 0, or -1 when memory ran out. */
#define STEP 64
typedef struct { int32_t row, query, at; } pair_t;

int64_t rescore(void *handle, int64_t q0, int64_t q1, int64_t row0, int64_t row1,
                const float *queries, const float *bank, int64_t d, const float *q_scale,
                const float *bank_scale) {
    block_t *blk = handle;
    if (q1 <= q0 || row1 <= row0) return 0;
    int64_t buckets = (row1 - row0 + STEP - 1) / STEP, total = 0;
    int64_t *start = calloc(buckets + 1, sizeof(int64_t)), *first = malloc(sizeof(int64_t) * (q1 - q0));
    if (!start || !first) { free(start); free(first); return -1; }
    for (int64_t q = q0; q < q1; q++) { /* each query's candidates in [row0, row1), counted per bucket */
        cands_t *c = blk->q + q;
        int64_t lo = 0, hi = c->n;
        while (lo < hi) { int64_t mid = (lo + hi) / 2; if (c->rows[mid] < row0) lo = mid + 1; else hi = mid; }
        first[q - q0] = lo;
        for (int64_t i = lo; i < c->n && c->rows[i] < row1; i++) start[(c->rows[i] - row0) / STEP + 1]++;
    }
    for (int64_t b = 0; b < buckets; b++) start[b + 1] += start[b];
    total = start[buckets];
    pair_t *pairs = malloc(sizeof(pair_t) * (total ? total : 1));
    if (!pairs) { free(start); free(first); return -1; }
    for (int64_t q = q0; q < q1; q++) {
        cands_t *c = blk->q + q;
        for (int64_t i = first[q - q0]; i < c->n && c->rows[i] < row1; i++)
            pairs[start[(c->rows[i] - row0) / STEP]++] = (pair_t){c->rows[i], (int32_t)q, (int32_t)i};
    }
    for (int64_t t = 0; t < total; t++) { /* bucket by bucket (start[] now holds their ends) */
        pair_t pr = pairs[t];
        float sim = dot(queries + (int64_t)pr.query * d, bank + (int64_t)pr.row * d, d);
        if (q_scale) sim = sim * q_scale[pr.query] * bank_scale[pr.row];
        blk->q[pr.query].sims[pr.at] = sim;
    }
    free(pairs); free(start); free(first);
    return 0;
}

/* float bits <-> a key whose unsigned order is the reverse of the values' order (-0 as +0) */
static inline uint32_t descending_key(float x) {
    x += 0.0f;
    uint32_t u;
    memcpy(&u, &x, 4);
    return ~(u ^ (uint32_t)(((int32_t)u >> 31) | (int32_t)0x80000000));
}
static inline float key_value(uint32_t key) {
    uint32_t a = ~key, u = (a & 0x80000000u) ? a ^ 0x80000000u : ~a;
    float x;
    memcpy(&x, &u, 4);
    return x;
}

/* Step 3: for queries [q0, q1) the k best re-scored candidates, best first (ties: lower row
 * first), into out_sims/out_rows (nq, k) rows q; -inf and -1 past a query's candidates.
 * A stable radix sort (8-bit digits, skipping digits all keys share) of each query's
 * candidates, which come in increasing row order. Returns the number of candidates of those
 * queries, or -1 when memory ran out. */
int64_t top_k(void *handle, int64_t q0, int64_t q1, int64_t k, float *out_sims, int64_t *out_rows) {
    block_t *blk = handle;
    int64_t total = 0, cap = 0;
    uint32_t *keys = NULL;
    int32_t *rows = NULL;
    for (int64_t q = q0; q < q1; q++) {
        cands_t *c = blk->q + q;
        int64_t n = c->n;
        total += n;
        if (n > cap) { /* two (key, row) buffers of n */
            cap = n;
            uint32_t *kg = realloc(keys, sizeof(uint32_t) * 2 * cap);
            if (!kg) { free(keys); free(rows); return -1; }
            keys = kg;
            int32_t *rg = realloc(rows, sizeof(int32_t) * 2 * cap);
            if (!rg) { free(keys); free(rows); return -1; }
            rows = rg;
        }
        uint32_t *ka = keys, *kb = keys + cap;
        int32_t *ra = rows, *rb = rows + cap;
        for (int64_t i = 0; i < n; i++) { ka[i] = descending_key(c->sims[i]); ra[i] = c->rows[i]; }
        for (int shift = 0; shift < 32; shift += 8) {
            int64_t count[256] = {0};
            for (int64_t i = 0; i < n; i++) count[(ka[i] >> shift) & 255]++;
            if (n == 0 || count[(ka[0] >> shift) & 255] == n) continue; /* one digit for all */
            int64_t at = 0;
            for (int d = 0; d < 256; d++) { int64_t m = count[d]; count[d] = at; at += m; }
            for (int64_t i = 0; i < n; i++) {
                int64_t to = count[(ka[i] >> shift) & 255]++;
                kb[to] = ka[i];
                rb[to] = ra[i];
            }
            uint32_t *kt = ka; ka = kb; kb = kt;
            int32_t *rt = ra; ra = rb; rb = rt;
        }
        int64_t kk = n < k ? n : k;
        for (int64_t t = 0; t < kk; t++) { out_sims[q * k + t] = key_value(ka[t]); out_rows[q * k + t] = ra[t]; }
        for (int64_t t = kk; t < k; t++) { out_sims[q * k + t] = -INFINITY; out_rows[q * k + t] = -1; }
    }
    free(keys); free(rows);
    return total;
}

/* ---------------------------------------------------------------- step 1 on the AMX tiles
 *
 * amx_select does step 1 without torch: it multiplies 32 queries by 32 bank rows at a time on
 * the AMX tiles (bf16 inputs, float32 sums, no output rounding) and looks at each 32 x 32
 * block while it is in L1, so the (queries x bank) similarities never go to memory. Per query
 * it keeps every row at or above a cut, with its bf16 similarity. Each time a query's list has
 * doubled (make_room), the k-th largest similarity in it, thr, bounds the k-th largest bf16 similarity of the bank
 * from below (k distinct rows reach it), so thr - band bounds the k-th largest float32 one, and
 * a row can be among the k most similar only if its bf16 similarity is >= thr - 2 band: that
 * is the new cut, which only rises; the list drops what fell below it. Every row seen at or
 * above the current cut is in the list, so at the end the same step on the whole list leaves
 * exactly the rows that can be among the k most similar. */

int64_t amx_ready(void) { /* 1 when this process may use the AMX tiles */
#ifdef HAVE_AMX
    /* Linux hands out the tile state on request: ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA */
    return syscall(SYS_arch_prctl, 0x1023, 18) == 0 ? 1 : 0;
#else
    return 0;
#endif
}

#ifdef HAVE_AMX
typedef struct __attribute__((packed)) {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} tile_config_t;

typedef struct { float *buf; int64_t cap; } scratch_t;

static inline __mmask16 first_lanes(int64_t n) { return n >= 16 ? 0xFFFF : (__mmask16)((1u << n) - 1); }

/* the k-th largest of a[0..n) (1 <= k <= n, no NaN), a left as it is: quickselect whose
 * partitions are vector compresses into scratch (4n + 64 floats); the first pivot is `guess`
 * (the previous k-th largest: few values pass it) unless it is -inf */
static float kth_largest(const float *a, int64_t n, int64_t k, float *scratch, float guess) {
    const float *in = a;
    const int64_t size = n; /* scratch: two pairs (above, below) of `size` floats, alternating */
    for (int pass = 0;; pass++) {
        if (n <= 16) { /* the last few: the value with fewer than k above it and k within */
            __mmask16 live = first_lanes(n);
            __m512 v = _mm512_mask_loadu_ps(_mm512_set1_ps(-INFINITY), live, in);
            for (int64_t i = 0; i < n; i++) {
                __m512 x = _mm512_set1_ps(in[i]);
                int64_t above = __builtin_popcount(_mm512_mask_cmp_ps_mask(live, v, x, _CMP_GT_OQ));
                int64_t same = __builtin_popcount(_mm512_mask_cmp_ps_mask(live, v, x, _CMP_EQ_OQ));
                if (above < k && k <= above + same) return in[i];
            }
            return in[0]; /* unreachable */
        }
        float x = in[0], y = in[n / 2], z = in[n - 1]; /* median of three */
        float p = x < y ? (y < z ? y : (x < z ? z : x)) : (x < z ? x : (y < z ? z : y));
        if (pass == 0 && guess > -INFINITY) p = guess;
        float *hi = scratch + (pass & 1) * 2 * (size + 16), *lo = hi + size + 16; /* not the pair read */
        int64_t nh = 0, nl = 0;
        __m512 pv = _mm512_set1_ps(p);
        for (int64_t i = 0; i < n; i += 16) {
            __mmask16 live = first_lanes(n - i);
            __m512 v = _mm512_maskz_loadu_ps(live, in + i);
            __mmask16 gt = _mm512_mask_cmp_ps_mask(live, v, pv, _CMP_GT_OQ);
            __mmask16 lt = _mm512_mask_cmp_ps_mask(live, v, pv, _CMP_LT_OQ);
            _mm512_storeu_ps(hi + nh, _mm512_maskz_compress_ps(gt, v)); /* 16 slack floats */
            _mm512_storeu_ps(lo + nl, _mm512_maskz_compress_ps(lt, v));
            nh += __builtin_popcount(gt);
            nl += __builtin_popcount(lt);
        }
        int64_t eq = n - nh - nl;
        if (k <= nh) { in = hi; n = nh; }
        else if (k <= nh + eq) return p;
        else { in = lo; k -= nh + eq; n = nl; }
    }
}

/* raise a query's cut from the k-th largest similarity in its list `c` (unchanged while the
 * list holds fewer than k rows) and drop what fell below it. 0, or -1 when memory ran out */
static int tighten(cands_t *c, float *cut, float *thr_, float band, int64_t k, scratch_t *w) {
    if (c->n < k) return 0;
    if (w->cap < 4 * c->n + 64) {
        float *grown = realloc(w->buf, sizeof(float) * (4 * c->n + 64));
        if (!grown) return -1;
        w->buf = grown;
        w->cap = 4 * c->n + 64;
    }
    float thr = kth_largest(c->sims, c->n, k, w->buf, *thr_);
    *thr_ = thr;
    /* the float32 subtraction may round up by half an ulp of its operands: the slack */
    float t = thr - 2.0f * band;
    t -= 1e-6f * (fabsf(thr) + 2.0f * band + 1e-30f);
    if (t > *cut) *cut = t;
    __m512 cv = _mm512_set1_ps(*cut);
    int64_t m = 0;
    for (int64_t i = 0; i < c->n; i += 16) { /* in place: the write index never passes the read one */
        __mmask16 live = first_lanes(c->n - i);
        __m512 v = _mm512_maskz_loadu_ps(live, c->sims + i);
        __m512i r = _mm512_maskz_loadu_epi32(live, c->rows + i);
        __mmask16 keep = _mm512_mask_cmp_ps_mask(live, v, cv, _CMP_GE_OQ);
        _mm512_storeu_ps(c->sims + m, _mm512_maskz_compress_ps(keep, v)); /* lists: 16 slack */
        _mm512_storeu_si512(c->rows + m, _mm512_maskz_compress_epi32(keep, r));
        m += __builtin_popcount(keep);
    }
    c->n = m;
    return 0;
}

/* called when a query's list may lack room for 32 more rows (n + 32 > next): its cut is raised
 * each time the list has doubled (at least 256 rows) since the last time (each raise costs a
 * pass over the list; a lagging cut lets in rows that a risen one would keep out), and the list
 * grows to hold `next` + 32 rows (and 16 more for whole-vector stores). 0, or -1 when memory
 * ran out */
static int make_room(cands_t *c, float *cut, float *thr, float band, int64_t k, scratch_t *w) {
    if (c->n + 32 > c->next) {
        if (tighten(c, cut, thr, band, k, w)) return -1;
        c->next = c->n + (c->n > 256 ? c->n : 256);
    }
    return grow(c, c->next + 32); /* room until the next raise */
}

/* Rows [r0, r1) of x (n, d) float32 (r0 a multiple of 16, r1 <= the padded row count) into
 * the bf16 tiles of AMX's A (operand 0) or B (operand 1) operand, as amx_select reads them:
 * per 16 rows and 32 columns one 1 KB tile, [row][column] for A, [pair of columns][row][2] for
 * B; rows >= n and columns >= d zero; dp = d rounded up to a multiple of 32. bf16 rounds to
 * nearest even. Unless scale is NULL, each row is first multiplied by scale[i] = 1 / |x_i|
 * (written; 0 for a zero row). For each row < n, with y_i the (scaled) float32 row, norm[i] = the larger of
 * |y_i| and |bf16(y_i)|, err[i] = |y_i - bf16(y_i)| (the difference is exact in float32), each
 * computed in float32 and raised by (d + 2) unit roundoffs, which covers the rounding of any
 * order of summation. */
void to_tiles(const float *x, int64_t n, int64_t d, int64_t r0, int64_t r1, int64_t dp,
              int64_t operand, uint16_t *tiles, double *norm, double *err, float *scale) {
    const int64_t groups = dp / 32;
    const double slack = 1.0 + (double)(d + 2) / 16777216.0;
    const __m512i pairs = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                             _mm512_set1_epi32(16));
    for (int64_t r = r0; r < r1; r++) {
        __m512 xx = _mm512_setzero_ps(), ww = _mm512_setzero_ps(), ee = _mm512_setzero_ps();
        __m512 by = _mm512_set1_ps(1.0f);
        if (scale && r < n) { /* 1 / |x_r| (0 for a zero row, as faiss.normalize_L2 leaves it) */
            for (int64_t c = 0; c < d; c += 16) {
                __m512 v = _mm512_maskz_loadu_ps(first_lanes(d - c), x + r * d + c);
                xx = _mm512_fmadd_ps(v, v, xx);
            }
            double ss = (double)_mm512_reduce_add_ps(xx);
            scale[r] = ss > 0 ? (float)(1.0 / sqrt(ss)) : 0.0f;
            by = _mm512_set1_ps(scale[r]);
            xx = _mm512_setzero_ps();
        }
        for (int64_t s = 0; s < groups; s++) {
            uint16_t *tile = tiles + ((r / 16) * groups + s) * 512;
            __m512i bf = _mm512_setzero_si512();
            if (r < n) {
                int64_t c = s * 32;
                __mmask16 mlo = first_lanes(d - c), mhi = first_lanes(d - c - 16 > 0 ? d - c - 16 : 0);
                __m512 lo = _mm512_mul_ps(_mm512_maskz_loadu_ps(mlo, x + r * d + c), by);
                __m512 hi = _mm512_mul_ps(_mm512_maskz_loadu_ps(mhi, x + r * d + c + 16), by);
                bf = (__m512i)_mm512_cvtne2ps_pbh(hi, lo); /* [lo 16, hi 16] */
                __m512 wlo = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(bf)), 16));
                __m512 whi = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(bf, 1)), 16));
                xx = _mm512_fmadd_ps(lo, lo, _mm512_fmadd_ps(hi, hi, xx));
                ww = _mm512_fmadd_ps(wlo, wlo, _mm512_fmadd_ps(whi, whi, ww));
                __m512 elo = _mm512_sub_ps(wlo, lo), ehi = _mm512_sub_ps(whi, hi);
                ee = _mm512_fmadd_ps(elo, elo, _mm512_fmadd_ps(ehi, ehi, ee));
            }
            if (operand == 0) _mm512_storeu_si512(tile + (r % 16) * 32, bf);
            else _mm512_i32scatter_epi32((int32_t *)tile + (r % 16), pairs, bf, 4);
        }
        if (r < n) {
            double a = sqrt((double)_mm512_reduce_add_ps(xx)), b = sqrt((double)_mm512_reduce_add_ps(ww));
            norm[r] = (a > b ? a : b) * slack;
            err[r] = sqrt((double)_mm512_reduce_add_ps(ee)) * slack;
        }
    }
}

/* one 32 x 32 block of similarities c[query][row]: queries g + j (j < nq, cuts cut[j]) and
 * bank rows i0 + r (r < 32, those in `real` exist): every row at or above its query's cut
 * joins the query's list. 0, or -1 when memory ran out */
static int look(block_t *blk, const float *c, int64_t g, int64_t nq, int64_t i0, uint32_t real,
                float *cut, float *thr, const float *band, int64_t k, scratch_t *w) {
    const __m512i lanes = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    for (int64_t j = 0; j < nq; j++) {
        __m512 lo = _mm512_load_ps(c + 32 * j), hi = _mm512_load_ps(c + 32 * j + 16);
        __m512 cv = _mm512_set1_ps(cut[j]);
        uint32_t keep = ((uint32_t)_mm512_cmp_ps_mask(hi, cv, _CMP_GE_OQ) << 16 |
                         _mm512_cmp_ps_mask(lo, cv, _CMP_GE_OQ)) & real;
        if (!keep) continue; /* most blocks, once the cut has risen */
        cands_t *cand = blk->q + g + j;
        if (cand->n + 32 > cand->next && make_room(cand, cut + j, thr + j, band[g + j], k, w))
            return -1;
        /* compressed in registers, stored whole: make_room left room for 32 */
        __m512i rows = _mm512_add_epi32(lanes, _mm512_set1_epi32((int32_t)i0));
        __mmask16 low = (__mmask16)keep, high = (__mmask16)(keep >> 16);
        _mm512_storeu_si512(cand->rows + cand->n, _mm512_maskz_compress_epi32(low, rows));
        _mm512_storeu_ps(cand->sims + cand->n, _mm512_maskz_compress_ps(low, lo));
        cand->n += __builtin_popcount(low);
        rows = _mm512_add_epi32(rows, _mm512_set1_epi32(16));
        _mm512_storeu_si512(cand->rows + cand->n, _mm512_maskz_compress_epi32(high, rows));
        _mm512_storeu_ps(cand->sims + cand->n, _mm512_maskz_compress_ps(high, hi));
        cand->n += __builtin_popcount(high);
    }
    return 0;
}

/* Queries per pass over the bank: their tiles stay in L2 (1 MB: 1,024 queries at d = 512, 256
 * at 2,048); bank rows per chunk: their tiles stay in L2 while every query of the pass meets
 * them (256 KB: 256 rows at d = 512, 64 at 2,048). */
#define AMX_GROUP 1024 /* at most */
#define AMX_ROWS 256   /* at most */
static inline int64_t fitting(int64_t bytes, int64_t row_bytes, int64_t most) {
    int64_t n = bytes / row_bytes / 32 * 32;
    return n < 32 ? 32 : n > most ? most : n;
}

/* Step 1 on AMX for queries [q0, q1) of the block (q0 a multiple of 32).
 * queries: the block's queries as AMX's A operand: for each 16 queries g and each 32
 * dimensions s, a 16 x 32 tile [query][dimension] at queries + (g * dp / 32 + s) * 512;
 * bank: as AMX's B operand: for each 16 rows i and each 32 dimensions s, a 16 x 16 x 2 tile
 * [pair of dimensions][row][2] at bank + (i * dp / 32 + s) * 512. Both zero-padded: queries
 * to a multiple of 32, the bank from nb rows to nb_pad (a multiple of 32), dimensions to dp (a
 * multiple of 32). band: per query of the block, as for select_candidates less the output
 * rounding (there is none here). Returns 0, or -1 when memory ran out. */
int64_t amx_select(const uint16_t *bank, int64_t nb, int64_t nb_pad, int64_t dp,
                   const uint16_t *queries, int64_t q0, int64_t q1, const float *band, int64_t k,
                   void *handle) {
    block_t *blk = handle;
    const int64_t steps = dp / 32;
    if (q1 <= q0) return 0;
    float cut[AMX_GROUP], thr[AMX_GROUP]; /* per query: its cut, its last k-th largest */
    scratch_t w = {NULL, 0};
    tile_config_t cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    for (int t = 0; t < 8; t++) { cfg.rows[t] = 16; cfg.colsb[t] = 64; }
    _tile_loadconfig(&cfg);
    /* the blocks of one group of 32 queries and one chunk of bank rows: computed, then looked at */
    float c[AMX_ROWS / 32][32 * 32] __attribute__((aligned(64))); /* [query][bank row] */
    int failed = 0;
    const int64_t group = fitting(1 << 20, dp * 2, AMX_GROUP), chunk = fitting(1 << 18, dp * 2, AMX_ROWS);
    for (int64_t g0 = q0; g0 < q1 && !failed; g0 += group) {
        int64_t g1 = g0 + group < q1 ? g0 + group : q1;
        for (int64_t q = 0; q < group; q++) cut[q] = thr[q] = -INFINITY;
        for (int64_t c0 = 0; c0 < nb_pad && !failed; c0 += chunk)
        for (int64_t g = g0; g < g1 && !failed; g += 32) {
            const uint16_t *a0 = queries + (g / 16) * steps * 512, *a1 = a0 + steps * 512;
            int64_t c1 = c0 + chunk < nb_pad ? c0 + chunk : nb_pad;
            for (int64_t i0 = c0; i0 < c1; i0 += 32) {
                const uint16_t *b0 = bank + (i0 / 16) * steps * 512, *b1 = b0 + steps * 512;
                float *out = c[(i0 - c0) / 32];
                _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
                for (int64_t s = 0; s < steps; s++) {
                    _tile_loadd(4, a0 + s * 512, 64);
                    _tile_loadd(5, a1 + s * 512, 64);
                    _tile_loadd(6, b0 + s * 512, 64);
                    _tile_loadd(7, b1 + s * 512, 64);
                    _tile_dpbf16ps(0, 4, 6); _tile_dpbf16ps(1, 4, 7);
                    _tile_dpbf16ps(2, 5, 6); _tile_dpbf16ps(3, 5, 7);
                }
                _tile_stored(0, out, 128); _tile_stored(1, out + 16, 128);
                _tile_stored(2, out + 512, 128); _tile_stored(3, out + 528, 128);
            }
            for (int64_t i0 = c0; i0 < c1 && !failed; i0 += 32)
                if (look(blk, c[(i0 - c0) / 32], g, g1 - g < 32 ? g1 - g : 32, i0,
                         nb - i0 >= 32 ? 0xFFFFFFFFu : (uint32_t)((1ull << (nb - i0)) - 1),
                         cut + (g - g0), thr + (g - g0), band, k, &w))
                    failed = 1;
        }
        for (int64_t q = g0; q < g1 && !failed; q++) /* the final cut */
            if (tighten(blk->q + q, cut + (q - g0), thr + (q - g0), band[q], k, &w)) failed = 1;
    }
    _tile_release();
    free(w.buf);
    return failed ? -1 : 0;
}
#else
void to_tiles(const float *x, int64_t n, int64_t d, int64_t r0, int64_t r1, int64_t dp,
              int64_t operand, uint16_t *tiles, double *norm, double *err, float *scale) {
    (void)x; (void)n; (void)d; (void)r0; (void)r1; (void)dp; (void)operand; (void)tiles;
    (void)norm; (void)err; (void)scale; /* not built with AMX: amx_ready() said so */
}
int64_t amx_select(const uint16_t *bank, int64_t nb, int64_t nb_pad, int64_t dp,
                   const uint16_t *queries, int64_t q0, int64_t q1, const float *band, int64_t k,
                   void *handle) {
    (void)bank; (void)nb; (void)nb_pad; (void)dp; (void)queries; (void)q0; (void)q1; (void)band;
    (void)k; (void)handle;
    return -2; /* not built with AMX: amx_ready() said so */
}
#endif

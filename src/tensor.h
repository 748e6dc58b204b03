/* ---- tensor: bf16/f16 conversion, Q8_0/Q4_0 blocks, matmul kernels, thread pool ----
   Dimension names used throughout: B batch, T time (tokens), C channels (hidden),
   H heads, D head dim, V vocab, r LoRA rank; a linear weight W is [N=out, K=in]. */

#define KMED_QK 32  /* elements per Q8_0/Q4_0 block */
typedef struct kmed_block_q8_0 { uint16_t d; int8_t qs[KMED_QK]; } kmed_block_q8_0;
typedef struct kmed_block_q4_0 { uint16_t d; uint8_t qs[KMED_QK / 2]; } kmed_block_q4_0;

/* Scalar conversions. f32 -> bf16/f16 round to nearest even; NaN stays NaN. */
KMED_API float kmed_bf16_to_f32(uint16_t h);
KMED_API uint16_t kmed_f32_to_bf16(float f);
KMED_API float kmed_f16_to_f32(uint16_t h);
KMED_API uint16_t kmed_f32_to_f16(float f);

/* Row conversion between f32 and any computable dtype (F32, F16, BF16, Q8_0, Q4_0).
   n must be a multiple of KMED_QK for the block types. Quantization reproduces GGML's
   reference quantizer bit for bit. */
KMED_API void kmed_quantize_row(kmed_dtype t, const float *x, void *y, size_t n);
KMED_API void kmed_dequantize_row(kmed_dtype t, const void *x, float *y, size_t n);
/* 1 if kmed can compute with this weight dtype. */
KMED_API int kmed_dtype_computable(kmed_dtype t);

/* Thread pool: a parallel-for over [0, n) split into contiguous ranges, one per thread,
   fixed by n and the thread count (so results never depend on scheduling). The caller's
   thread takes part. A NULL pool runs serially. */
typedef struct kmed_pool kmed_pool;
typedef void (*kmed_pool_fn)(void *ctx, size_t begin, size_t end, int thread);
/* n_threads 0 = number of online CPUs. Free with kmed_pool_free. */
KMED_API kmed_result kmed_pool_create(kmed_pool **pool, int n_threads, kmed_error *err);
KMED_API void kmed_pool_free(kmed_pool *pool);
KMED_API int kmed_pool_threads(const kmed_pool *pool);     /* 1 for NULL */
/* Runs fn over [0, n) in ranges that are multiples of `grain` (except the last); blocks
   until all are done. Not reentrant: fn must not call kmed_pool_for on the same pool. */
KMED_API void kmed_pool_for(kmed_pool *pool, size_t n, size_t grain, kmed_pool_fn fn,
                            void *ctx);

/* Matmul flags. */
enum {
    KMED_MM_ACC = 1,   /* y += ... instead of y = ... */
    KMED_MM_FAST = 2   /* quantize activations like llama.cpp (x to Q8_0 for Q8_0/Q4_0
                          weights, to BF16 for BF16 weights): faster, not bit-comparable
                          with the f32 reference path */
};
/* y[M,N] = x[M,K] · W[N,K]^T, W row-major in dtype wt (F32, F16, BF16, Q8_0, Q4_0; K a
   multiple of KMED_QK for the block types). Without KMED_MM_FAST the activations stay
   f32 and each weight row is converted exactly; the result equals the scalar reference up
   to summation order. Parallel over N. */
KMED_API void kmed_matmul(kmed_pool *pool, float *y, const float *x, const void *w,
                          kmed_dtype wt, size_t M, size_t N, size_t K, int flags);
/* dx[M,K] += dy[M,N] · W[N,K] for a weight in any computable dtype (dequantized on the
   fly, never stored in f32): the input gradient of kmed_matmul. Parallel over K. */
KMED_API void kmed_matmul_dx(kmed_pool *pool, float *dx, const float *dy, const void *w,
                             kmed_dtype wt, size_t M, size_t N, size_t K);
/* dw[N,K] += dy[M,N]^T · x[M,K] (f32): the weight gradient of kmed_matmul. */
KMED_API void kmed_matmul_dw(kmed_pool *pool, float *dw, const float *dy, const float *x,
                             size_t M, size_t N, size_t K);
/* Plain f32 GEMM, row-major: C[M,N] = alpha * op(A) · op(B) + beta * C, op = transpose
   when ta/tb is set; lda/ldb/ldc are row strides. Routed to cblas_sgemm under
   KMED_USE_OPENBLAS. */
KMED_API void kmed_sgemm(kmed_pool *pool, int ta, int tb, size_t M, size_t N, size_t K,
                         float alpha, const float *A, size_t lda, const float *B,
                         size_t ldb, float beta, float *C, size_t ldc);
/* Dot product of f32 x with one row of W in dtype wt (n elements): the scalar reference
   that every SIMD kernel is tested against lives beside it. */
KMED_API float kmed_dot_row(kmed_dtype wt, const void *wrow, const float *x, size_t n);
/* SIMD f32 dot product for hot inner loops (attention scores, small heads); the summation
   order is fixed by n alone, so results do not depend on threads. Equals
   kmed_dot_row(KMED_F32, a, b, n) up to summation order. */
KMED_API float kmed_dot_f32(const float *a, const float *b, size_t n);

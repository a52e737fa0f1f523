/* One Lion step (Chen et al. 2023, arXiv 2302.06675) over many float32 tensors in one call, for the CPU.
 *
 * hf_ext/ops/native.py compiles this file at first use with the system C compiler (-O3 -march=native
 * -ffp-contract=off -fno-trapping-math -fopenmp) and hf_ext/ops/lion.py calls it through ctypes.
 *
 * The work is cut into chunks (chunk c: elements [start[c], start[c] + length[c]) of tensor tensor[c]) that one
 * OpenMP loop shares among the threads, so a model's hundreds of tensors cost one call, not one call each.
 *
 * Per element, the same floating-point operations in the same order as the eager kernels of hf_ext/ops/lion.py, so
 * that every kernel gives the same bits. fmaf() stands where eager torch uses add(x, alpha=a), a fused multiply-add;
 * -ffp-contract=off keeps the compiler from fusing any other multiply and add, which would round differently.
 *
 * An element whose gradient is NaN or ±inf keeps its parameter and momentum (one such value would otherwise make
 * the momentum NaN for good), and its chunk is flagged in nonfinite[c] for the caller to report. The check costs no
 * memory traffic: the gradient is read once, for the update.
 */
#include <stdint.h>
#include <string.h>
#include <math.h>

static inline int is_finite_float(float value)
{
    uint32_t bits;
    memcpy(&bits, &value, sizeof bits);  /* an exponent of all ones is inf or NaN */
    return (bits & 0x7f800000u) != 0x7f800000u;
}

void hf_ext_lion_fp32(int64_t chunks, const int64_t *tensor, const int64_t *start, const int64_t *length,
                      float *const *params, const float *const *grads, float *const *momenta,
                      float decay, float minus_lr, float beta1, float one_minus_beta1, float beta2,
                      float one_minus_beta2, uint8_t *nonfinite, int threads)
{
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t c = 0; c < chunks; ++c) {
        float *restrict param = params[tensor[c]] + start[c];
        const float *restrict grad = grads[tensor[c]] + start[c];
        float *restrict momentum = momenta[tensor[c]] + start[c];
        int bad = 0;
        for (int64_t i = 0; i < length[c]; ++i) {
            float g = grad[i], m = momentum[i], p = param[i];
            int finite = is_finite_float(g);
            bad |= !finite;
            float interpolated = fmaf(g, one_minus_beta1, m * beta1);
            float direction = (float)(interpolated > 0.0f) - (float)(interpolated < 0.0f);  /* sign, 0 at 0 */
            float new_param = fmaf(direction, minus_lr, p * decay);  /* decay = 1 - lr * weight_decay */
            float new_momentum = fmaf(g, one_minus_beta2, m * beta2);
            param[i] = finite ? new_param : p;
            momentum[i] = finite ? new_momentum : m;
        }
        nonfinite[c] = (uint8_t)bad;
    }
}

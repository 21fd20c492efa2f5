"""Every numeric tolerance of the test suite, with the reason for its size."""

# fp64 against fp64: only reassociation of sums differs (~1e-16 relative per op, a
# few hundred ops deep).
FP64 = 1e-10
# fp32 against fp32 when both sides compute the same function through different
# kernels (~1e-7 relative per op, outputs of order 1).
FP32 = 1e-5
# fp32 against HF's modules: the bound. HF computes RoPE angles in fp32 and
# softmax after subtracting a max; we use fp64 angles, so ~1e-6 differences appear.
FP32_VS_HF = 1e-4
# bf16 against the fp32 truth, relative to the output's magnitude: bf16 keeps 8
# mantissa bits (4e-3 relative), and q, k, v, scores and the output projection each
# round once, so ~4 roundings of order-1 values compound to a few 1e-2.
BF16_VS_FP32 = 3e-2
# An fp64 model against an fp64 HF model: HF's rotary module still computes the RoPE
# angles in fp32 (~6e-8 relative), which moves logits of order 5 by ~1e-6 after two
# layers; everything else is fp64.
FP64_VS_HF = 1e-5
# Quantized models against their fp32 twin, decoding the fp32 model's 256 greedy tokens one step at a time
# (`distattn.models.accuracy.agreement`) on the suite's tiny random checkpoints, whose logit spreads are narrow
# and whose near-ties flip easily (real checkpoints agree more; docs/accuracy.md has every figure). Per scheme:
# (mean error bound, max error bound for dense families, top-1 agreement bound); errors are |logit error| / spread.
# int8 weights: per-row symmetric, each weight off by at most half a step (0.4% of its row's largest), bf16
# activations in decode (another 0.4%): measured mean 0.14-0.45%, max 0.8-3.4%, top-1 94-100%.
INT8_MEAN_LOGIT_ERROR = 1e-2
INT8_MAX_LOGIT_ERROR = 6e-2
INT8_TOP1_AGREEMENT = 0.9
# the int8 kernel returns bf16: 8 mantissa bits, half an ulp of relative error on outputs of order 1
INT8_KERNEL_BF16 = 2**-8
# int4 weights: a scale and zero per 32 inputs, 16 levels, each weight off by up to 1/30 of its group's range:
# measured mean 1.0-5.5%, max 6.7-63%, top-1 64-100% (MoE experts quantized too).
INT4_MEAN_LOGIT_ERROR = 8e-2
INT4_MAX_LOGIT_ERROR = 0.8
INT4_TOP1_AGREEMENT = 0.6
# fp8 (e4m3) cache: 3 mantissa bits, each K / V element off by up to 1/16 of itself: measured mean 0.16-1.2%,
# max 1.3-7.2% (dense), top-1 91-100%.
KV_FP8_MEAN_LOGIT_ERROR = 2e-2
KV_FP8_MAX_LOGIT_ERROR = 0.12
KV_FP8_TOP1_AGREEMENT = 0.88
# int8 cache: a scale per token and head, each element off by at most 1/254 of its vector's largest:
# measured mean 0.03-0.21%, max 0.2-1.4% (dense), top-1 98-100%.
KV_INT8_MEAN_LOGIT_ERROR = 5e-3
KV_INT8_MAX_LOGIT_ERROR = 3e-2
KV_INT8_TOP1_AGREEMENT = 0.97
# MoE families (gpt-oss, Llama 4): a router near-tie picks another expert for one token, a jump of up to
# ~60% of the spread at that step whatever the scheme (measured 0.2-0.62); the mean and top-1 bounds still hold.
MOE_MAX_LOGIT_ERROR = 0.8

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
# int8 weights (per-row symmetric, scale = max|w| / 127: each weight moves by at most half a step, 0.4% of
# its row's largest) with bf16 activations in decode (another 0.4%): logits move by under 1% of their spread
# on average; a near-tie can flip the top token, so greedy paths agree on most positions, not all.
INT8_MEAN_LOGIT_ERROR = 1e-2
INT8_TOP1_AGREEMENT = 0.9
# the int8 kernel returns bf16: 8 mantissa bits, half an ulp of relative error on outputs of order 1
INT8_KERNEL_BF16 = 2**-8
# int4 weights (a scale and zero per 32 inputs, 16 levels: each weight moves by up to 1/30 of its group's range)
# on the suite's tiny random models, whose near-ties flip easily: measured mean logit error 1-6% of the spread
# and top-1 agreement 49-95% (Llama 4's NoPE layers amplify it); bounds a little beyond the worst family.
INT4_MEAN_LOGIT_ERROR = 8e-2
INT4_TOP1_AGREEMENT = 0.45

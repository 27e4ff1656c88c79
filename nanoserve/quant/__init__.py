"""Weight formats as data: a matrix is either a float array or a :class:`QuantizedWeight`.

The layouts are documented (and dequantized) in ``kernels_ref.quant``; this package
creates quantized weights (from float matrices, ``gguf_quantize`` for the GGUF block
formats with llama.cpp's rounding, or from GGUF bytes), dispatches a
linear layer to the kernel matching a weight's format, and looks up embedding rows of a
quantized table (dequantizing only the rows gathered).

    format   arrays                              kernel
    ------   ---------------------------------   -----------
    fp32     (float32 [out, in],)                linear
    fp16     (float16 [out, in],)                linear
    int8     (int8 [out, in], f32 scale [out])   linear_int8
    int4     (uint8 [out, in/2], f32 [out, G])   linear_int4
    q8_0     (uint8 [out, in/32*34],)            linear_q8_0
    q4_0     (uint8 [out, in/32*18],)            linear_q4_0
    q4_1     (uint8 [out, in/32*20],)            linear_q4_1

With ``--activations int8`` the q8_0 / q4_0 / q4_1 weights go to ``linear_q8_0_a8`` /
``linear_q4_0_a8`` / ``linear_q4_1_a8`` instead (``kernels_ref.int8_activations``).
"""

from nanoserve.quant.formats import (
    WEIGHT_FORMATS,
    QuantizedWeight,
    apply_linear,
    dequantize,
    embedding_rows,
    gather_rows,
    quantize,
)

__all__ = [
    "WEIGHT_FORMATS",
    "QuantizedWeight",
    "apply_linear",
    "dequantize",
    "embedding_rows",
    "gather_rows",
    "quantize",
]

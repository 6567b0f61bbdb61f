"""What a base model loaded quantized by bitsandbytes takes (``load_in_4bit``/``load_in_8bit``).

transformers quantizes every linear layer but the output head; the rest (embeddings, norms, the
head) keeps the dtype it was loaded in. Per quantized weight matrix bitsandbytes holds:

- **4 bits** (NF4 or FP4): two weights per byte, one float32 scale (``absmax``) per block of 64
  weights and a 16-entry float32 code table; with nested quantization (``use_bnb_nested_quant``)
  the scales are themselves stored in 8 bits, with one float32 scale per 256 of them, a
  256-entry code table and a float32 offset: about 0.5 + 4/64 bytes per weight plain, 0.5 + 1/64
  nested;
- **8 bits** (LLM.int8): one byte per weight and a float32 scale per output row.

A forward dequantizes one weight matrix at a time to the compute dtype, and frees it after use.
``tests/planning/test_quantized.py`` checks these bytes against what bitsandbytes allocates.
"""

from __future__ import annotations

from sapo.planning.shape import LinearLayer, ModelShape

BLOCK = 64  # weights per 4-bit block (bitsandbytes' default blocksize)
NESTED_BLOCK = 256  # 8-bit scales per second-level block
CODE_4BIT = 16 * 4  # the NF4/FP4 code table, float32
CODE_NESTED = 256 * 4 + 4  # the 8-bit code table of the scales and their offset, float32


def quantized_layers(shape: ModelShape) -> list[LinearLayer]:
    """The linear layers bitsandbytes quantizes: all but the output head."""
    return [layer for layer in shape.linear_layers if not layer.name.endswith("lm_head")]


def quantized_layer_bytes(layer: LinearLayer, bits: int, nested: bool = False) -> int:
    """Bytes bitsandbytes holds for one ``layer``'s weight quantized to ``bits`` (4 or 8)."""
    weights = layer.in_features * layer.out_features
    if bits == 8:
        return weights + 4 * layer.out_features
    if bits != 4:
        raise ValueError(f"quantized_bits={bits}: bitsandbytes quantizes to 4 or 8 bits")
    blocks = -(-weights // BLOCK)
    if nested:
        scales = blocks + 4 * -(-blocks // NESTED_BLOCK) + CODE_NESTED
    else:
        scales = 4 * blocks
    return -(-weights // 2) + scales + CODE_4BIT


def base_weight_bytes(shape: ModelShape, weight_bytes: int, bits: int | None, nested: bool = False) -> int:
    """Bytes of the base model's weights: quantized layers at ``bits``, every other parameter at
    ``weight_bytes`` (its dtype as loaded); all at ``weight_bytes`` when ``bits`` is ``None``."""
    if bits is None:
        return weight_bytes * shape.parameters
    layers = quantized_layers(shape)
    kept = shape.parameters - sum(layer.in_features * layer.out_features for layer in layers)
    return weight_bytes * kept + sum(quantized_layer_bytes(layer, bits, nested) for layer in layers)


def dequantized_bytes(shape: ModelShape, compute_bytes: int) -> int:
    """The largest weight matrix dequantized for a matrix product, in the compute dtype."""
    return compute_bytes * max(layer.in_features * layer.out_features for layer in quantized_layers(shape))

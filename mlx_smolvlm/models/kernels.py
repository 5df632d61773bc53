"""Fused pixel shuffle as one GPU gather: a Metal kernel on Macs, a CUDA kernel with `mlx[cuda]`.

The plain-MLX twin, `connector.pixel_shuffle`, is the reference: the kernel must equal it
exactly (the op is a permutation). Without a GPU backend `pixel_shuffle_kernel` is `None`
and the connector uses the twin.
"""

import mlx.core as mx

from ..errors import InvalidRequestError

# Grid (D, L, N): thread (d, row, n) writes out[n, row // R^2, (row % R^2) * D + d], which is
# x[n, (i*R + a)*S + j*R + b, d] for row = (i*S/R + j)*R^2 + a*R + b. R, S (patches per
# side) and D are template constants, so the divisions are by compile-time constants.
_GATHER = """
    if (d >= D) {
        return;
    }
    constexpr int SR = S / R;
    int ab = row % (R * R);
    int q = row / (R * R);
    size_t src_row = (size_t)n * S * S + (q / SR * R + ab / R) * S + q % SR * R + ab % R;
    out[((size_t)n * S * S + row) * D + d] = x[src_row * D + d];
"""

_METAL_SOURCE = (
    "uint d = thread_position_in_grid.x;\n"
    "uint row = thread_position_in_grid.y;\n"
    "uint n = thread_position_in_grid.z;\n" + _GATHER
)

# CUDA launches whole blocks (grid rounded up), hence the `d >= D` guard in _GATHER.
_CUDA_SOURCE = (
    "unsigned int d = blockIdx.x * blockDim.x + threadIdx.x;\n"
    "unsigned int row = blockIdx.y;\n"
    "unsigned int n = blockIdx.z;\n" + _GATHER
)


def _make_pixel_shuffle_kernel():
    if mx.metal.is_available():
        make, source = mx.fast.metal_kernel, _METAL_SOURCE
    elif mx.cuda.is_available():
        make, source = mx.fast.cuda_kernel, _CUDA_SOURCE
    else:
        return None
    return make(name="pixel_shuffle", input_names=["x"], output_names=["out"], source=source)


pixel_shuffle_kernel = _make_pixel_shuffle_kernel()


def can_use_kernel() -> bool:
    """True when a GPU kernel was built and work runs on the GPU by default."""
    return pixel_shuffle_kernel is not None and mx.default_device() == mx.gpu


def pixel_shuffle(x: mx.array, r: int) -> mx.array:
    """Kernel twin of `connector.pixel_shuffle`: (N, s*s, D) -> (N, s*s/r^2, r*r*D)."""
    N, L, D = x.shape
    s = int(round(L**0.5))
    if s * s != L or s % r:
        raise InvalidRequestError(f"pixel shuffle needs a square patch grid with side divisible by {r}, got {L} patches")
    # T is unused by the body but keeps one compiled kernel per dtype.
    out = pixel_shuffle_kernel(
        inputs=[x],
        template=[("T", x.dtype), ("R", r), ("S", s), ("D", D)],
        grid=(D, L, N),
        threadgroup=(min(D, 256), 1, 1),
        output_shapes=[(N, L // (r * r), r * r * D)],
        output_dtypes=[x.dtype],
    )
    return out[0]

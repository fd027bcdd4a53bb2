"""Small LLVM operations numba does not expose, for the top-K kernel (cellpuzzles.data.topk).

Each is a numba ``@intrinsic`` that emits plain LLVM IR: generic vector compares, shuffles,
``cttz``/``ctpop`` and ``llvm.prefetch``. LLVM lowers them to the best instructions the CPU has
(on AVX-512: one compare into a mask register per 8-16 lanes, ``vpmaxsq``/``vpminsq``) and to
ordinary code on CPUs without such instructions, so results never depend on the machine.
"""

from __future__ import annotations

from llvmlite import ir
from numba.core import types
from numba.extending import intrinsic

_I1 = ir.IntType(1)
_I32 = ir.IntType(32)
_I64 = ir.IntType(64)


def _splat(builder, x, vt):
    undef = ir.Constant(vt, ir.Undefined)
    zero = ir.Constant(ir.VectorType(_I32, vt.count), None)
    return builder.shuffle_vector(builder.insert_element(undef, x, ir.Constant(_I32, 0)), undef, zero)


def _vector_at(context, builder, aty, arr, index, lanes):
    """Pointer to arr[index:index + lanes] as an LLVM vector, and the element type."""
    a = context.make_array(aty)(context, builder, arr)
    et = a.data.type.pointee
    vt = ir.VectorType(et, lanes)
    return builder.bitcast(builder.gep(a.data, [index]), vt.as_pointer()), et, vt


@intrinsic
def mask64(typingctx, arr, base, lo, span):
    """Bit t of the int64 result: (arr[base + t] - lo) < span as unsigned integers, t = 0..63.

    arr holds int32 or int64; lo and span are cut to its width. Reads exactly 64 elements.
    """
    if not (isinstance(arr, types.Array) and arr.dtype in (types.int32, types.int64) and arr.layout == "C"):
        return None
    def codegen(context, builder, sig, args):
        ptr, et, vt = _vector_at(context, builder, sig.args[0], args[0], args[1], 64)
        v = builder.load(ptr, align=et.width // 8)
        lo, span = (builder.trunc(x, et) if et.width < 64 else x for x in args[2:])
        c = builder.icmp_unsigned("<", builder.sub(v, _splat(builder, lo, vt)), _splat(builder, span, vt))
        return builder.bitcast(c, _I64)
    return types.int64(arr, types.int64, types.int64, types.int64), codegen


@intrinsic
def ctz(typingctx, x):
    """Trailing zero bits of a non-zero int64."""
    def codegen(context, builder, sig, args):
        return builder.cttz(args[0], ir.Constant(_I1, 1))
    return types.int64(types.int64), codegen


@intrinsic
def popcount(typingctx, x):
    """Set bits of an int64."""
    def codegen(context, builder, sig, args):
        return builder.ctpop(args[0])
    return types.int64(types.int64), codegen


@intrinsic
def prefetch(typingctx, arr, index):
    """Ask the CPU to start loading arr[index]'s cache line (a hint: it never faults or changes results)."""
    def codegen(context, builder, sig, args):
        a = context.make_array(sig.args[0])(context, builder, args[0])
        p = builder.bitcast(builder.gep(a.data, [args[1]]), ir.IntType(8).as_pointer())
        fnty = ir.FunctionType(ir.VoidType(), [p.type, _I32, _I32, _I32])
        fn = builder.module.declare_intrinsic("llvm.prefetch", [p.type], fnty)
        builder.call(fn, [p, ir.Constant(_I32, 0), ir.Constant(_I32, 3), ir.Constant(_I32, 1)])
        return context.get_dummy_value()
    return types.none(arr, types.int64), codegen


def _bitonic_sort_desc(n):
    """An intrinsic sorting arr[0:n] (int64) in place, descending, with a bitonic network.

    The n values stay in vector registers: each of the log2(n)(log2(n)+1)/2 stages is one lane
    shuffle, a compare, and selects for the max / min. Branch-free, so its time does not depend on
    the data (for n = 64 about a tenth of an O(n^2) rank count).
    """
    if n < 2 or n & (n - 1):
        raise ValueError("n must be a power of two >= 2")

    @intrinsic
    def sort_desc(typingctx, arr):
        if not (isinstance(arr, types.Array) and arr.dtype == types.int64 and arr.ndim == 1 and arr.layout == "C"):
            return None
        def codegen(context, builder, sig, args):
            ptr, _, vt = _vector_at(context, builder, sig.args[0], args[0], ir.Constant(_I64, 0), n)
            v = builder.load(ptr, align=8)
            undef = ir.Constant(vt, ir.Undefined)
            size = 2
            while size <= n:
                stride = size // 2
                while stride >= 1:
                    perm = ir.Constant(ir.VectorType(_I32, n), [i ^ stride for i in range(n)])
                    partner = builder.shuffle_vector(v, undef, perm)
                    gt = builder.icmp_signed(">", v, partner)
                    hi = builder.select(gt, v, partner)
                    lo = builder.select(gt, partner, v)
                    # the lower lane of a pair takes the max in blocks sorted descending, the min otherwise
                    take_hi = [int(((i & stride) == 0) == ((i & size) == 0)) for i in range(n)]
                    v = builder.select(ir.Constant(ir.VectorType(_I1, n), take_hi), hi, lo)
                    stride //= 2
                size *= 2
            builder.store(v, ptr, align=8)
            return context.get_dummy_value()
        return types.none(arr), codegen

    return sort_desc


sort64_desc = _bitonic_sort_desc(64)
sort128_desc = _bitonic_sort_desc(128)
